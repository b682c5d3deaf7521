"""One module's ΔW = B·A·scale, formed on demand: whole, block of rows by block of rows, or at a few
coordinates.

:class:`LowRankDelta` is what a merger's ``module_statistics`` receives on the fast path (see
:func:`unmerge_core.hookspecs.unmerge_mergers`). A statistic that only needs one pass over the
entries (a magnitude threshold, a norm) can stream :meth:`LowRankDelta.row_blocks`: each block is
formed while the previous one is still in cache and the dense module never exists, which saves the
memory traffic of writing and re-reading it (about a quarter of the time at 7B shapes).

:meth:`dense` and :meth:`row_blocks` run exactly the same calls — ``torch.mm`` of each block of
:data:`BLOCK_ROWS` rows of ``B`` with ``A``, then the scaling — so their entries agree bit for bit,
which is what lets a threshold computed on one pass decide entries read on another. (BLAS may pick a
different kernel for a different matrix shape, so ``LoraAdapter.delta``'s single ``B @ A`` is only
guaranteed equal up to float32 rounding; at the 7B shapes it is bit-equal in practice.) Run the
block products single-threaded (:func:`unmerge_core.thread_map` does): a 64-row product is
too small to split across threads.

While a full pass runs (``dense`` or ``row_blocks`` to the end), the entries at ``gather`` indices
are recorded in :attr:`LowRankDelta.gathered`: the runner takes the masked values of the task from
the very numbers its statistics were computed on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch

BLOCK_ROWS = 64  # 64 × 3584 float32 ≈ 0.9 MB: a block stays in one core's L2 cache


class LowRankDelta:
    """ΔW of one module from its LoRA factors.

    Args:
        a: ``(rank, in)`` float32 factor.
        b: ``(out, rank)`` float32 factor.
        scale: ``α / r`` (or the rsLoRA scale).
        gather: Optional sorted flat indices whose values a full pass records in :attr:`gathered`.
        dense_buffer: Optional ``(out, in)`` float32 tensor that :meth:`dense` writes into, or a
            callable returning one (called only if :meth:`dense` is used).
        block_buffer: Optional ``(≥1, in)`` float32 tensor that :meth:`row_blocks` writes into.
    """

    def __init__(self, a: torch.Tensor, b: torch.Tensor, scale: float, *, gather: np.ndarray | None = None,
                 dense_buffer: torch.Tensor | Callable[[], torch.Tensor] | None = None,
                 block_buffer: torch.Tensor | None = None) -> None:
        if a.shape[0] != b.shape[1]:
            raise ValueError(f"factors do not chain: A {tuple(a.shape)}, B {tuple(b.shape)}")
        self.a, self.b, self.scale = a, b, float(scale)
        self.shape: tuple[int, int] = (int(b.shape[0]), int(a.shape[1]))
        self.gather = None if gather is None else np.asarray(gather, dtype=np.int64)
        self.gathered: np.ndarray | None = None
        self._dense_buffer = dense_buffer
        self._block_buffer = block_buffer

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def dense(self) -> torch.Tensor:
        """The dense float32 ΔW (in the dense buffer when one was given: do not keep it)."""
        out = self._dense_buffer() if callable(self._dense_buffer) else self._dense_buffer
        if out is None:
            out = torch.empty(self.shape)
        for start in range(0, self.shape[0], BLOCK_ROWS):
            stop = min(start + BLOCK_ROWS, self.shape[0])
            self._form(start, stop, out[start:stop])
        if self.gather is not None:
            self.gathered = out.reshape(-1).numpy()[self.gather].astype(np.float64)
        return out

    def dense_on(self, device: torch.device) -> torch.Tensor:
        """The whole float32 ΔW formed on ``device`` in one product (a GPU holds a module easily);
        a full pass, so :attr:`gathered` is recorded as with :meth:`dense`. Equal to :meth:`dense`
        to float32 rounding (bit-equal on the CPU for the products BLAS blocks the same way)."""
        out = torch.mm(self.b.to(device), self.a.to(device))
        if self.scale != 1:
            out.mul_(self.scale)
        if self.gather is not None:
            idx = torch.as_tensor(self.gather, device=device)
            self.gathered = out.reshape(-1)[idx].to(torch.float64).cpu().numpy()
        return out

    def form_rows(self, start: int, stop: int, out: torch.Tensor) -> None:
        """Rows ``start … stop`` of ΔW into ``out`` (float32, ``(stop − start, in)``): the very numbers
        :meth:`dense` and :meth:`row_blocks` give for those rows when ``start`` is a multiple of
        :data:`BLOCK_ROWS` and ``stop − start`` at most that."""
        self._form(start, stop, out)

    def _form(self, start: int, stop: int, out: torch.Tensor) -> None:
        torch.mm(self.b[start:stop], self.a, out=out)
        if self.scale == 1:
            return
        if out.device.type == "cpu" and out.dtype == torch.float32:
            # numpy's float32 multiply by the float32-rounded scale: the numbers torch's mul_ gives, in
            # a third of its single-threaded time
            values = out.numpy()
            np.multiply(values, np.float32(self.scale), out=values)
        else:
            out.mul_(self.scale)

    def row_blocks(self) -> Iterator[np.ndarray]:
        """Yield ΔW block of :data:`BLOCK_ROWS` rows at a time, each as a flat float32 array.

        A yielded array is overwritten by the next one: consume it before advancing. Concatenated,
        the blocks are ``dense().reshape(-1)`` exactly.
        """
        n_out, n_in = self.shape
        rows = max(1, min(BLOCK_ROWS, n_out))
        buffer = self._block_buffer
        if buffer is None or buffer.shape[0] < rows or buffer.shape[1] != n_in:
            buffer = torch.empty((rows, n_in))
        pieces: list[np.ndarray] = []
        bounds = None if self.gather is None else np.searchsorted(self.gather, np.arange(0, n_out + rows, rows) * n_in)
        for i, start in enumerate(range(0, n_out, rows)):
            stop = min(start + rows, n_out)
            block = buffer[: stop - start]
            self._form(start, stop, block)
            flat = block.reshape(-1).numpy()
            if bounds is not None and self.gather is not None:
                local = self.gather[bounds[i]:bounds[i + 1]] - start * n_in
                pieces.append(flat[local].astype(np.float64))
            yield flat
        if self.gather is not None:
            self.gathered = np.concatenate(pieces) if pieces else np.zeros(0)

    def sample(self, rows: int = 256, cols: int = 256, seed: int = 0) -> np.ndarray:
        """ΔW at random rows × random columns (float32; one small ``mm``, so not bit-equal to :meth:`dense`).

        A cheap, representative sample of the entries, e.g. to place a quantile bracket before one
        streaming pass.
        """
        n_out, n_in = self.shape
        rng = np.random.default_rng(seed)
        r = np.sort(rng.choice(n_out, min(rows, n_out), replace=False))
        c = np.sort(rng.choice(n_in, min(cols, n_in), replace=False))
        block = self.b[torch.from_numpy(r)] @ self.a[:, torch.from_numpy(c)]
        if self.scale != 1:
            block.mul_(self.scale)
        return block.reshape(-1).numpy()

    def values_at(self, flat_indices: np.ndarray) -> np.ndarray:
        """ΔW at a few coordinates from the factors (float64; no dense module, not bit-equal to it)."""
        idx = np.asarray(flat_indices, dtype=np.int64)
        rows, cols = np.divmod(idx, self.shape[1])
        b_rows = self.b.numpy()[rows].astype(np.float64)
        a_cols = self.a.numpy()[:, cols].astype(np.float64)
        return np.einsum("ij,ji->i", b_rows, a_cols) * self.scale
