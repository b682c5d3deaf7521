"""Exact order statistics of large ΔW modules, fast on a CPU.

Two selections recur at paper scale (12.8M entries per ``q_proj`` of a 7B model):

- the k-th largest ``|ΔW|`` of one module: the magnitude threshold of TIES
  (:func:`kth_largest_abs`);
- the k largest entries of a score (the top-k mask, :func:`topk_flat_indices`).

Both return exactly what a full sort would (``numpy.partition`` / ``torch.topk``), but touch most
entries only with cheap, cache-sized comparisons:

- ``kth_largest_abs`` guesses a narrow bracket around the answer from a sample, then makes one
  pass over the values in cache-sized blocks, counting the entries below the bracket and keeping
  those inside it. The k-th value is then selected among the few kept entries. If the bracket missed
  (it is checked with the counts), it falls back to a full partition, so the answer never depends
  on the sample — only the time does. ``kth_largest_abs_streamed`` does the same on values that
  arrive block by block (a LoRA ΔW formed row block by row block: the dense module never exists).
- ``topk_flat_indices`` uses the row maxima: the k-th largest row maximum ``m`` is a lower bound of
  the k-th largest entry (k rows each hold an entry ``≥ m``), so only entries ``≥ m`` can be in the
  top k.

Every function works on one module at a time and allocates at most one chunk besides its input.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

CHUNK = 1 << 18  # entries per pass chunk: 1 MiB of float32, stays in a core's L2 cache
SAMPLE = 1 << 16  # entries sampled to place the bracket
_SMALL = 1 << 20  # below this many entries a plain partition is as fast


def magnitude_keep_count(density: float, numel: int) -> int:
    """How many entries mergekit's magnitude sparsification keeps: ``max(1, int(density · numel))``.

    The expression is evaluated exactly as in ``mergekit.sparsify.magnitude`` (Python float product,
    truncated), so the rounding of ``k`` is the same.
    """
    if numel == 0:
        return 0
    if density >= 1:
        return numel
    return max(1, int(density * numel))


def kth_largest_abs(values: torch.Tensor | np.ndarray, k: int) -> float:
    """The ``k``-th largest ``|value|`` (1-based), exactly, as a Python float.

    Args:
        values: Any shape, float32 or float64; read only.
        k: ``1 ≤ k ≤ numel``.

    Entries with ``|value| ≥`` the result are at least ``k`` in number, and the entries strictly
    above it are fewer than ``k``: keeping ``|value| ≥ result`` keeps the top ``k`` plus any entries
    tied with the k-th.
    """
    flat = _as_numpy_flat(values)
    n = flat.size
    _check_k(k, n)
    if n <= _SMALL:
        return float(np.partition(np.abs(flat), n - k)[n - k])
    stride = _sample_stride(n)
    sample = flat[stride // 2::stride]
    return kth_largest_abs_streamed(lambda: _chunks(flat), n, k, sample)


def kth_largest_abs_torch(values: torch.Tensor, k: int) -> float:
    """:func:`kth_largest_abs` on a tensor where it lies (a GPU: ``torch.kthvalue`` there, no copy to
    the host); the same value as on the CPU for the same numbers."""
    flat = values.detach().reshape(-1)
    _check_k(k, flat.numel())
    return float(torch.kthvalue(flat.abs(), flat.numel() - k + 1).values.item())


def kth_largest_abs_streamed(blocks: Callable[[], Iterable[np.ndarray]], numel: int, k: int,
                             sample: np.ndarray) -> float:
    """The ``k``-th largest ``|value|`` of values given as a stream of blocks, exactly.

    Args:
        blocks: Called to get an iterable of 1-D arrays whose concatenation is all the values
            (a block may be overwritten by the next one). Called once, or twice when the bracket
            from ``sample`` missed (then every ``|value|`` is collected: the exact fallback).
        numel: Total number of values.
        k: ``1 ≤ k ≤ numel``.
        sample: Some of the values (any representative subset) to place the bracket.
    """
    stream = KthLargestAbsStream(numel, k, sample)
    for block in blocks():
        stream.add(block)
    return stream.result(blocks)


class KthLargestAbsStream:
    """:func:`kth_largest_abs_streamed` fed one block at a time (by a pass that also feeds others).

    ``add`` each block in order (it is read, never kept: it may be overwritten afterwards), then
    ``result(blocks)``; ``blocks`` is called again only when the bracket missed (the exact fallback).
    """

    def __init__(self, numel: int, k: int, sample: np.ndarray) -> None:
        _check_k(k, numel)
        self.numel, self.k = numel, k
        self.rank = numel - k  # 0-based position in ascending order of |value|
        self.sample_abs = np.abs(np.asarray(sample, dtype=np.float64))
        self.lo, self.hi = _bracket(self.sample_abs, self.rank, numel)
        self.seen = 0
        self._counter = _BracketCounter(self.lo, self.hi)

    def add(self, block: np.ndarray) -> None:
        self.seen += block.size
        self._counter.add(block)

    def result(self, blocks: Callable[[], Iterable[np.ndarray]]) -> float:
        if self.seen != self.numel:
            raise ValueError(f"the stream gave {self.seen} values, expected {self.numel}")
        below, inside = self._counter.finish()
        j = self.rank - below
        if 0 <= j < inside.size:
            return float(np.partition(inside, j)[j])
        # the sample misled us (a row × column sample of a low-rank ΔW is correlated: ~1.5% of 7B
        # modules): one more pass with a bracket four times as wide, then the exact fallback
        lo, hi = _bracket(self.sample_abs, self.rank, self.numel, sigmas=24.0)
        below, inside = _count_and_collect(blocks(), lo, hi)
        j = self.rank - below
        if 0 <= j < inside.size:
            return float(np.partition(inside, j)[j])
        everything = np.concatenate([np.abs(b) for b in blocks()])
        return float(np.partition(everything, self.rank)[self.rank])


def _check_k(k: int, n: int) -> None:
    if not 1 <= k <= n:
        raise ValueError(f"k={k} is outside 1..{n}")


def _as_numpy_flat(values: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach()
        if values.dtype not in (torch.float32, torch.float64):
            values = values.to(torch.float32)
        values = values.contiguous().numpy()
    return np.ascontiguousarray(values).reshape(-1)


def _sample_stride(n: int) -> int:
    """An odd stride, coprime with the usual row lengths, giving about :data:`SAMPLE` entries."""
    stride = max(1, n // SAMPLE) | 1
    while stride > 1 and math.gcd(stride, 2 * 3 * 5 * 7) != 1:
        stride += 2
    return stride


def _chunks(flat: np.ndarray) -> Iterator[np.ndarray]:
    for start in range(0, flat.size, CHUNK):
        yield flat[start:start + CHUNK]


def _bracket(sample_abs: np.ndarray, rank: int, numel: int, sigmas: float = 6.0) -> tuple[float, float]:
    """A value interval that holds the ``rank``-th smallest of ``numel`` values with high probability.

    Placed at the same quantile of the sample, widened by ±``sigmas`` σ of the sample quantile's rank
    (the sample may be correlated, e.g. whole rows and columns); a miss only costs another pass.
    """
    m = sample_abs.size
    if m == 0:
        return -math.inf, math.inf
    q = rank / max(numel - 1, 1)
    centre = q * (m - 1)
    margin = sigmas * math.sqrt(m * q * (1 - q)) + 8.0
    lo_i, hi_i = int(centre - margin), int(centre + margin) + 1
    picks = [i for i in (lo_i, hi_i) if 0 <= i < m]
    work = np.array(sample_abs, dtype=np.float64)
    if picks:
        work.partition(picks)
    lo = float(work[lo_i]) if lo_i >= 0 else -math.inf
    hi = float(work[hi_i]) if hi_i < m else math.inf
    return lo, hi


def _count_and_collect(blocks: Iterable[np.ndarray], lo: float, hi: float) -> tuple[int, np.ndarray]:
    """Number of ``|x| < lo`` and the array of ``|x|`` with ``lo ≤ |x| ≤ hi``, in one pass over blocks."""
    counter = _BracketCounter(lo, hi)
    for block in blocks:
        counter.add(block)
    return counter.finish()


class _BracketCounter:
    """The one pass of :func:`_count_and_collect`, one block at a time (work buffers reused)."""

    def __init__(self, lo: float, hi: float) -> None:
        self.lo, self.hi = lo, hi
        self.below = 0
        self.kept: list[np.ndarray] = []
        self.dtype: np.dtype = np.dtype(np.float32)
        self._work: np.ndarray | None = None
        self._below_mask = self._inside_mask = np.empty(0, dtype=bool)

    def add(self, block: np.ndarray) -> None:
        m = block.size
        if self._work is None or self._work.size < m or self._work.dtype != block.dtype:
            self._work = np.empty(m, dtype=block.dtype)
            self._below_mask = np.empty(m, dtype=bool)
            self._inside_mask = np.empty(m, dtype=bool)
            self.dtype = block.dtype
        a, b, c = self._work[:m], self._below_mask[:m], self._inside_mask[:m]
        lo_t, hi_t = block.dtype.type(self.lo), block.dtype.type(self.hi)
        np.abs(block, out=a)
        np.less(a, lo_t, out=b)
        self.below += int(np.count_nonzero(b))
        np.less_equal(a, hi_t, out=c)
        np.logical_xor(b, c, out=c)  # lo ≤ a ≤ hi  (a < lo implies a ≤ hi)
        self.kept.append(np.compress(c, a))  # faster than a[c] for a sparse mask

    def finish(self) -> tuple[int, np.ndarray]:
        return self.below, (np.concatenate(self.kept) if self.kept else np.empty(0, dtype=self.dtype))


def top_k_positions(values: torch.Tensor, k: int) -> torch.Tensor:
    """Positions (ascending, int64) of the ``k`` largest of a 1-D tensor, ties broken canonically:
    every value above the k-th, then the first positions holding the k-th value itself.

    ``torch.topk`` leaves the choice among tied values to its implementation, which depends on the
    array it is given; a canonical rule makes the mask the same whichever candidates are searched
    (the whole module, the row-maximum subset, or the shared pass's streamed candidates).
    """
    n = int(values.numel())
    if k >= n:
        return torch.arange(n, device=values.device)
    if k <= 0:
        return torch.zeros(0, dtype=torch.int64, device=values.device)
    kth = torch.topk(values, k, sorted=False).values.min()
    if torch.isnan(kth):  # torch.topk ranks NaN first, and no comparison with NaN holds
        raise ValueError("the scores hold NaN (a ΔW that overflowed float32?): no top k can be taken")
    above = torch.nonzero(values > kth).reshape(-1)
    tied = torch.nonzero(values == kth).reshape(-1)[: k - int(above.numel())]
    return torch.sort(torch.cat([above, tied])).values


def topk_flat_indices(score: torch.Tensor, k: int) -> np.ndarray:
    """Flat indices of the ``k`` largest entries of a 2-D ``score``, sorted ascending (int64).

    The set ``torch.topk(score.reshape(-1), k)`` gives, with ties at the k-th value broken by the
    lowest flat index (:func:`top_k_positions`), so it is a function of the scores alone.
    """
    if score.dim() != 2:
        score = score.reshape(1, -1)
    rows, cols = score.shape
    n = rows * cols
    k = min(k, n)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    flat = score.reshape(-1)
    if k > rows or n <= _SMALL:
        return top_k_positions(flat, k).cpu().numpy().astype(np.int64)
    row_max = score.amax(dim=1)
    bound = torch.topk(row_max, k, sorted=False).values.min()
    # ≥ k entries, ascending, all of the top k among them (every entry tied with the k-th value too)
    candidates = torch.nonzero(flat >= bound).reshape(-1)
    best = top_k_positions(flat[candidates], k)
    return candidates[best].cpu().numpy().astype(np.int64)
