"""Exact order statistics of large ΔW modules, fast on a CPU.

Two selections recur at paper scale (12.8M entries per ``q_proj`` of a 7B model):

- the k-th largest ``|ΔW|`` of one module: the magnitude threshold of TIES
  (:func:`kth_largest_abs`);
- the k largest entries of a score (the top-k mask, :func:`topk_flat_indices`).

Both return exactly what a full sort would (``numpy.partition`` / ``torch.topk``), but touch most
entries only with cheap, cache-sized comparisons:

- ``kth_largest_abs`` guesses a narrow bracket around the answer from a fixed-seed sample, then makes
  one pass over the tensor in chunks of :data:`CHUNK` entries, counting the entries below the bracket
  and keeping those inside it. The k-th value is then selected among the few kept entries. If the
  bracket missed (it is checked with the counts), it falls back to a full partition, so the answer
  never depends on the sample — only the time does.
- ``topk_flat_indices`` uses the row maxima: the k-th largest row maximum ``m`` is a lower bound of
  the k-th largest entry (k rows each hold an entry ``≥ m``), so only entries ``≥ m`` can be in the
  top k.

Every function works on one module at a time and allocates at most one chunk besides its input.
"""

from __future__ import annotations

import math

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
    if not 1 <= k <= n:
        raise ValueError(f"k={k} is outside 1..{n}")
    rank = n - k  # 0-based position in ascending order of |value|
    if n <= _SMALL:
        return float(np.partition(np.abs(flat), rank)[rank])
    lo, hi = _bracket(flat, rank)
    below, inside = _count_and_collect(flat, lo, hi)
    j = rank - below
    if 0 <= j < inside.size:
        return float(np.partition(inside, j)[j])
    return float(np.partition(np.abs(flat), rank)[rank])  # the sample misled us: exact fallback


def _as_numpy_flat(values: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach()
        if values.dtype not in (torch.float32, torch.float64):
            values = values.to(torch.float32)
        values = values.contiguous().numpy()
    return np.ascontiguousarray(values).reshape(-1)


def _bracket(flat: np.ndarray, rank: int) -> tuple[float, float]:
    """A value interval that holds the ``rank``-th smallest ``|x|`` with high probability.

    The sample is strided (prefetch-friendly) with an odd stride that is not a multiple of common
    row lengths, so it spreads over rows and columns; a miss only costs the exact fallback.
    """
    n = flat.size
    stride = max(1, n // SAMPLE) | 1
    while stride > 1 and math.gcd(stride, 2 * 3 * 5 * 7) != 1:  # coprime with usual row lengths
        stride += 2
    sample = np.abs(flat[stride // 2::stride])
    m = sample.size
    q = rank / max(n - 1, 1)
    centre = q * (m - 1)
    margin = 4.5 * math.sqrt(m * q * (1 - q)) + 8.0  # ±4.5σ of the sample rank, plus slack
    lo_i, hi_i = int(centre - margin), int(centre + margin) + 1
    picks = [i for i in (lo_i, hi_i) if 0 <= i < m]
    if picks:
        sample.partition(picks)
    lo = float(sample[lo_i]) if lo_i >= 0 else -math.inf
    hi = float(sample[hi_i]) if hi_i < m else math.inf
    return lo, hi


def _count_and_collect(flat: np.ndarray, lo: float, hi: float) -> tuple[int, np.ndarray]:
    """Number of ``|x| < lo`` and the array of ``|x|`` with ``lo ≤ |x| ≤ hi``, in one chunked pass."""
    n = flat.size
    size = min(CHUNK, n)
    work = np.empty(size, dtype=flat.dtype)
    below_mask = np.empty(size, dtype=bool)
    inside_mask = np.empty(size, dtype=bool)
    below = 0
    kept: list[np.ndarray] = []
    lo_t, hi_t = flat.dtype.type(lo), flat.dtype.type(hi)
    for start in range(0, n, size):
        chunk = flat[start:start + size]
        m = chunk.size
        a, b, c = work[:m], below_mask[:m], inside_mask[:m]
        np.abs(chunk, out=a)
        np.less(a, lo_t, out=b)
        below += int(np.count_nonzero(b))
        np.less_equal(a, hi_t, out=c)
        np.logical_xor(b, c, out=c)  # lo ≤ a ≤ hi  (a < lo implies a ≤ hi)
        kept.append(a[c])
    return below, (np.concatenate(kept) if kept else np.empty(0, dtype=flat.dtype))


def topk_flat_indices(score: torch.Tensor, k: int) -> np.ndarray:
    """Flat indices of the ``k`` largest entries of a 2-D ``score``, sorted ascending (int64).

    The same set as ``torch.topk(score.reshape(-1), k)`` (ties at the k-th value may be broken
    differently, as ``torch.topk`` itself does not specify the order among ties).
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
        top = torch.topk(flat, k, sorted=False).indices
        return np.sort(top.numpy().astype(np.int64))
    row_max = score.amax(dim=1)
    bound = torch.topk(row_max, k, sorted=False).values.min()
    candidates = torch.nonzero(flat >= bound).reshape(-1)  # ≥ k entries, all of the top k among them
    best = torch.topk(flat[candidates], k, sorted=False).indices
    return np.sort(candidates[best].numpy().astype(np.int64))
