"""Input statistics of a model's linear modules: forward pre-hooks that sum what each module receives.

:func:`record_input_statistics` runs batches through a loaded model and, for each named module,
sums every non-padding token's input vector and its square per feature (float64), which is all an
activation-scaled merge (Scale-SVD, OATS) needs. Trainers call it on their base model with a task's
training batches (:class:`~unmerge_core.InputStatisticsTrainer`); the runner stores the result with
:func:`save_input_statistics` and hands it to mergers (:class:`~unmerge_core.ActivationMerger`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from unmerge_core.errors import UnmergeError
from unmerge_core.io.store import atomic_save_tensors
from unmerge_core.types import InputStatistics

STATISTICS_TENSORS = "input_statistics.safetensors"


class _Accumulator:
    """Σ x and Σ x² per input feature of one module, over the tokens the current mask keeps."""

    def __init__(self) -> None:
        self.count = 0
        self.total: torch.Tensor | None = None
        self.squares: torch.Tensor | None = None
        self.keep: torch.Tensor | None = None  # (batch, seq) booleans of the batch in flight

    def __call__(self, _module: Any, args: tuple[Any, ...]) -> None:
        x = args[0].detach()
        if self.keep is None or x.dim() < 2:
            raise UnmergeError("record_input_statistics: a module was called outside a recorded batch")
        if tuple(x.shape[:-1]) != tuple(self.keep.shape):  # padding could not be told from tokens
            raise UnmergeError(f"record_input_statistics: a module's input has shape {tuple(x.shape)}, not "
                               f"(batch, seq, features) of the batch {tuple(self.keep.shape)}")
        rows = x[self.keep]
        if self.total is None:
            self.total = torch.zeros(x.shape[-1], dtype=torch.float64)
            self.squares = torch.zeros(x.shape[-1], dtype=torch.float64)
        rows = rows.to(torch.float64).cpu()
        self.total += rows.sum(dim=0)
        self.squares += (rows * rows).sum(dim=0)  # type: ignore[operator]
        self.count += int(rows.shape[0])


@torch.no_grad()
def record_input_statistics(model: Any, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                            modules: Sequence[str]) -> dict[str, InputStatistics]:
    """Sum each named module's inputs over the non-padding tokens of ``batches``.

    Args:
        model: A loaded ``torch.nn.Module`` (a transformers causal LM); it is put in eval mode for the
            pass and back afterwards.
        batches: ``(input_ids, attention_mask)`` pairs, ``(batch, seq)`` each; tokens whose mask is 0 are
            left out of the sums.
        modules: Names as ``model.named_modules()`` gives them (and as adapters name their modules).

    Returns:
        One :class:`~unmerge_core.InputStatistics` per module. A name the model lacks, or a module that
        never received an input, is an :class:`~unmerge_core.UnmergeError` naming it.
    """
    named = dict(model.named_modules())
    missing = [m for m in modules if m not in named]
    if missing:
        raise UnmergeError(f"the base model has no module {missing[0]!r} (of {len(missing)} asked for) to record "
                           "input statistics of")
    accumulators = {m: _Accumulator() for m in modules}
    handles = [named[m].register_forward_pre_hook(accumulators[m]) for m in modules]
    training = bool(getattr(model, "training", False))
    model.eval()
    try:
        device = next(model.parameters()).device
        for input_ids, attention_mask in batches:
            keep = attention_mask.to(torch.bool)
            for acc in accumulators.values():
                acc.keep = keep.to(device)
            model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.train(training)
    out = {}
    for module, acc in accumulators.items():
        if acc.total is None or acc.squares is None or acc.count == 0:
            raise UnmergeError(f"module {module!r} received no input from the batches: no input statistics for it")
        out[module] = InputStatistics(acc.count, acc.total, acc.squares)
    return out


def check_input_statistics(stats: Mapping[str, InputStatistics], modules: Sequence[str],
                           widths: Mapping[str, int], who: str) -> None:
    """Refuse statistics that miss a module, have the wrong width or are not finite, in one line naming it."""
    for module in modules:
        entry = stats.get(module)
        if entry is None:
            raise UnmergeError(f"{who}: no input statistics for module {module!r}")
        width = widths[module]
        for name in ("total", "squares"):
            value = getattr(entry, name)
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != (width,):
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise UnmergeError(f"{who}: input statistics of {module!r}: {name} has shape {got}, expected ({width},)")
            if not torch.isfinite(value).all():
                raise UnmergeError(f"{who}: input statistics of {module!r}: {name} is not finite")
        if entry.count <= 0:
            raise UnmergeError(f"{who}: input statistics of {module!r} count no token")


def save_input_statistics(directory: Path, stats: Mapping[str, InputStatistics], meta: Mapping[str, Any]) -> None:
    """Write ``stats`` as safetensors (``<module>.total`` / ``<module>.squares``; counts in the metadata)."""
    tensors = {}
    counts = {}
    for module, entry in stats.items():
        tensors[f"{module}.total"] = entry.total.to(torch.float64).contiguous()
        tensors[f"{module}.squares"] = entry.squares.to(torch.float64).contiguous()
        counts[module] = int(entry.count)
    atomic_save_tensors(directory / STATISTICS_TENSORS, tensors,
                        metadata={"counts": json.dumps(counts), "meta": json.dumps(dict(meta), sort_keys=True)})


def load_input_statistics(directory: Path) -> dict[str, InputStatistics]:
    """What :func:`save_input_statistics` wrote."""
    path = Path(directory) / STATISTICS_TENSORS
    try:
        with safe_open(str(path), framework="pt") as handle:
            counts = json.loads((handle.metadata() or {}).get("counts", "{}"))
            return {module: InputStatistics(int(n), handle.get_tensor(f"{module}.total"),
                                            handle.get_tensor(f"{module}.squares"))
                    for module, n in counts.items()}
    except (OSError, ValueError, KeyError) as exc:
        raise UnmergeError(f"{path}: unreadable input statistics ({exc}); remove the folder to recompute them") from None
