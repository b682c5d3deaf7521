"""One pass over the dictionary's ΔW for the mask and the merge statistics.

The masker (``|ΔW|`` aggregated over the dictionary, top-k per module) and the fast merge path's
statistics (TIES's magnitude threshold of every task, and the task's values at the mask) both need
each adapter's dense ΔW, module by module. Formed separately, the dictionary's ΔW is formed twice.
When the masker is a :class:`~unmerge_core.types.FoldingMasker` and the merger a
:class:`~unmerge_core.types.StreamingStatisticsMerger`, :func:`shared_pass` forms each dictionary
adapter's ΔW once per module, :data:`~unmerge_core.io.lowrank.BLOCK_ROWS` rows at a time, and hands
every block to the masker's fold and to the statistics streams of the adapters that need them.

The values at the mask are taken from the same blocks: after a block of rows of every adapter is
formed, the fold names the coordinates of those rows that can still be in the mask, and their
values are kept; the mask is a subset of them. So the statistics artifact holds, as when computed on
its own, the task's values in exactly the float32 numbers its threshold came from, and the results
(mask, thresholds, values) are bit for bit those of the separate stages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from unmerge_core.errors import PluginError, plugin_errors
from unmerge_core.io.adapters import LoraAdapter
from unmerge_core.io.lowrank import BLOCK_ROWS, LowRankDelta
from unmerge_core.pipeline.parallel import BufferPool, thread_map
from unmerge_core.types import Mask


@dataclass(frozen=True)
class StatisticsRequest:
    """Statistics of dictionary adapter ``adapter`` (an index) wanted from ``merger`` (its plugin ``label``)."""

    adapter: int
    merger: Any
    label: str


@dataclass
class SharedPassResult:
    mask: Mask
    statistics: list[tuple[dict[str, dict[str, float] | None], np.ndarray] | None] = field(default_factory=list)
    """Per request: ``({module: statistics}, values at the mask in mask order)``; ``None`` where the
    merger declined to stream (its ``statistics_stream`` returned ``None``): compute it separately."""


def shared_pass(masker: Any, masker_label: str, adapters: Sequence[LoraAdapter],
                requests: Sequence[StatisticsRequest], workers: int | None = None) -> SharedPassResult | None:
    """The mask and the requested statistics from one formation of each adapter's ΔW per module.

    Returns ``None`` when the masker declines (its ``fold_plan`` returned ``None``). Modules run on
    ``workers`` threads, largest first; each thread holds one module's aggregate and one block of
    rows per adapter, in buffers that are freed with the pass.
    """
    adapters = list(adapters)
    with plugin_errors("masker", masker_label):
        plan = masker.fold_plan(adapters)
        if plan is None:
            return None
        modules = list(plan.modules)
    pool = BufferPool()
    by_adapter: dict[int, list[int]] = {}
    for r, request in enumerate(requests):
        by_adapter.setdefault(request.adapter, []).append(r)

    def one(module: str) -> tuple[np.ndarray, list[tuple[dict[str, float], np.ndarray] | None]]:
        with plugin_errors("masker", masker_label):
            fold = plan.fold(module, pool)
        n_out, n_in = adapters[0].modules[module].shape
        deltas = []
        for adapter in adapters:
            a, b = adapter.factors(module)
            deltas.append(LowRankDelta(a, b, adapter.scale(module)))
        streams: list[Any] = []
        for request in requests:
            with plugin_errors("merger", request.label):
                streams.append(request.merger.statistics_stream(deltas[request.adapter], module))
        keeping = [i for i in range(len(adapters)) if any(streams[r] is not None for r in by_adapter.get(i, ()))]
        rows = min(BLOCK_ROWS, n_out)
        # an adapter whose values are kept needs its block until the rows' candidates are known;
        # the others share one buffer
        blocks = [pool.get((rows, n_in), f"pass-{i}" if i in keeping else "pass") for i in range(len(adapters))]
        offered: list[np.ndarray] = []
        kept: dict[int, list[np.ndarray]] = {i: [] for i in keeping}
        for start in range(0, n_out, rows):
            stop = min(start + rows, n_out)
            for i, delta in enumerate(deltas):
                block = blocks[i][: stop - start]
                delta.form_rows(start, stop, block)
                flat = block.reshape(-1).numpy()
                for r in by_adapter.get(i, ()):
                    if streams[r] is not None:
                        with plugin_errors("merger", requests[r].label):
                            streams[r].add(flat)
                with plugin_errors("masker", masker_label):
                    fold.add(i, start, block)
            with plugin_errors("masker", masker_label):
                candidates = np.asarray(fold.candidates(start, stop), dtype=np.int64)
            local = candidates - start * n_in
            if local.size and (local[0] < 0 or local[-1] >= (stop - start) * n_in or np.any(np.diff(local) <= 0)):
                raise PluginError("masker", masker_label, f"fold.candidates({start}, {stop}) of {module} "
                                                          "returned indices outside those rows or not ascending")
            offered.append(candidates)
            for i in keeping:
                kept[i].append(blocks[i][: stop - start].reshape(-1).numpy()[local].astype(np.float64))
        with plugin_errors("masker", masker_label):
            chosen = np.asarray(fold.select(), dtype=np.int64)
        all_offered = np.concatenate(offered) if offered else np.zeros(0, dtype=np.int64)
        position = np.searchsorted(all_offered, chosen)
        inside = position < all_offered.size
        if not np.all(inside) or not np.array_equal(all_offered[position[inside]], chosen):
            raise PluginError("masker", masker_label, f"fold.select() of {module} returned coordinates "
                                                      "that were never offered as candidates")
        results: list[tuple[dict[str, float], np.ndarray] | None] = []
        for r, request in enumerate(requests):
            if streams[r] is None:
                results.append(None)
                continue
            with plugin_errors("merger", request.label):
                stats = {str(k): float(v) for k, v in dict(streams[r].finish()).items()}
            results.append((stats, np.concatenate(kept[request.adapter])[position]))
        return chosen, results

    order = sorted(modules, key=lambda m: -adapters[0].modules[m].shape[0] * adapters[0].modules[m].shape[1])
    done = dict(zip(order, thread_map(one, order, workers)))
    mask = Mask({m: done[m][0] for m in modules}, {m: adapters[0].modules[m].shape for m in modules})
    statistics: list[tuple[dict[str, dict[str, float] | None], np.ndarray] | None] = []
    for r in range(len(requests)):
        if any(done[m][1][r] is None for m in modules):
            statistics.append(None)
            continue
        stats: dict[str, dict[str, float] | None] = {m: done[m][1][r][0] for m in modules}  # type: ignore[index]
        values = np.concatenate([done[m][1][r][1] for m in modules]) if modules else np.zeros(0)  # type: ignore[index]
        statistics.append((stats, values))
    return SharedPassResult(mask, statistics)
