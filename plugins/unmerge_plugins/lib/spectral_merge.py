"""Linear algebra shared by the SVD-based mergers (TSV-M, Iso-C, Iso-CTS), factored for LoRA inputs.

A LoRA task vector is ``τ = scale · B · A`` with ``B`` (out × r) and ``A`` (r × in). The T constituents of
a target stack into ``L = [B₁/‖B₁‖ … B_T/‖B_T‖]`` (out × K) and ``R = [A₁/‖A₁‖; …]`` (K × in), K = Σ rₜ,
each constituent's scale ``wₜ · scaleₜ · ‖Bₜ‖ · ‖Aₜ‖`` kept aside, and every matrix these methods form — each weighted task, their sum, a task projected off a subspace —
is ``L · C · R`` for a small K × K core ``C``. :class:`LowRankFrame` works only with the two Gram
matrices ``LᵀL`` and ``RRᵀ`` (two K × K products, the only operations that touch out- or in-sized
data) and K × K algebra:

- an orthonormal basis of the span of L is ``L · W Λ^{-1/2}`` from the eigendecomposition
  ``LᵀL = W Λ Wᵀ`` (directions with ``√λ ≤ RTOL · √λ_max`` dropped), so the SVD of ``L C R`` is
  the SVD of the small matrix ``Λ_L^{1/2} W_Lᵀ C W_R Λ_R^{1/2}``;
- singular vectors are kept as coefficients: ``U = L · X``; the polar factor of stacked vectors
  ``L · X`` is ``L · X · H^{-1/2}`` with ``H = Xᵀ (LᵀL) X``;
- the result is gathered at the mask from the rows of L and the columns of R it needs.

At Qwen2.5-7B shapes (3584 × 3584, r = 32, T = 5: K = 160) the Gram products take about 5 ms where
an SVD of the stacked 3584 × 160 factor takes 33 ms, and nothing out × in is ever formed (a dense
SVD of the module takes over a minute and 600 MB).

The dense route (:func:`thin_svd`, :func:`polar` on dense tensors) is the reference the tests
compare the factored one with; both keep exact-rank SVDs: singular values ``≤ RTOL · σ_ref`` are
treated as zero, so the arbitrary null-space vectors of a rank-deficient SVD never enter a result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from unmerge_core import LowRankDelta

RTOL = 1e-6
"""Relative rank tolerance: singular values at or below ``RTOL · σ_max`` are treated as zero."""

NOISE = 1e-12
"""Singular values of the factored algebra below ``NOISE · ‖L‖‖R‖`` are round-off (see LowRankFrame)."""

DTYPE = torch.float64

TaskVector = LowRankDelta | torch.Tensor
"""One constituent's ΔW of one module: its LoRA factors, or a dense tensor (the dense reference)."""


@dataclass(frozen=True)
class Factored:
    """``Δ = U diag(S) Vᵀ`` with U (out × K), S (K,), V (in × K), float64."""

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.U.shape[0]), int(self.V.shape[0])

    def dense(self) -> torch.Tensor:
        return (self.U * self.S) @ self.V.T

    def gather(self, flat_indices: np.ndarray) -> np.ndarray:
        """Δ at row-major flat indices: ``Σₖ U[i, k] S[k] V[j, k]`` (float64), never forming Δ."""
        idx = torch.as_tensor(np.asarray(flat_indices, dtype=np.int64))
        n_in = self.V.shape[0]
        rows, cols = torch.div(idx, n_in, rounding_mode="floor"), idx % n_in
        return ((self.U[rows] * self.S) * self.V[cols]).sum(dim=1).numpy()


def is_factored(task: TaskVector) -> bool:
    return isinstance(task, LowRankDelta)


def thin_svd(m: torch.Tensor, ref: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact-rank thin SVD ``(U, s, V)`` of a small or thin matrix: σ ≤ RTOL·ref dropped (ref: σ_max)."""
    u, s, vh = torch.linalg.svd(m.to(DTYPE), full_matrices=False)
    top = float(s[0]) if s.numel() else 0.0
    keep = s > RTOL * (top if ref is None else ref)
    return u[:, keep], s[keep], vh[keep].T


def polar(m: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor ``P Qᵀ`` of ``m = P Λ Qᵀ``: the closest matrix with orthonormal
    columns (what the TSV and Iso papers call orthogonalising the stacked singular vectors).

    When the stacked vectors are linearly dependent (constituents sharing a direction exactly) the
    polar factor is not unique: the directions of the zero singular values are arbitrary and would
    make the result depend on rounding. Those are dropped (``Λ ≤ RTOL · Λ_max``), giving the unique
    partial isometry on the span of ``m``.
    """
    if m.shape[1] == 0:
        return m.to(DTYPE)
    u, s, vh = torch.linalg.svd(m.to(DTYPE), full_matrices=False)
    keep = s > RTOL * float(s[0]) if s.numel() else s > 0
    return u[:, keep] @ vh[keep]


def dense(task: TaskVector) -> torch.Tensor:
    """``τ`` as a dense float64 tensor."""
    if isinstance(task, LowRankDelta):
        return (task.b.to(DTYPE) @ task.a.to(DTYPE)) * task.scale
    return task.to(DTYPE)


def _basis(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(coef, root, λ_max)`` for a Gram matrix ``G = XᵀX``: ``X · coef`` has orthonormal columns
    spanning X (directions with singular value ≤ RTOL · σ_max dropped) and ``X = (X · coef) · root``
    on that span."""
    lam, w = torch.linalg.eigh(gram)
    top = float(lam[-1]) if lam.numel() else 0.0
    keep = lam > (RTOL**2) * top if top > 0 else torch.zeros_like(lam, dtype=torch.bool)
    lam, w = lam[keep], w[:, keep]
    root = lam.sqrt()
    return w / root, (w * root).T, max(top, 0.0)


class LowRankFrame:
    """The constituents of one module in factored form (see the module docstring).

    Args:
        tasks: One :class:`~unmerge_core.LowRankDelta` per constituent.
        weights: Each constituent's target weight (folded into its left factor).
    """

    def __init__(self, tasks: Sequence[LowRankDelta], weights: Sequence[float],
                 device: torch.device | None = None) -> None:
        # each constituent's factors are normalised and its scale (weight · α/r · ‖B‖ · ‖A‖) moves into
        # the core: a constituent a million times smaller than another keeps its own directions in
        # the basis, as it does in the dense route. The stacks are filled in place (one float64 copy
        # of each factor, where converting, normalising and concatenating made three).
        ranks = [int(t.a.shape[0]) for t in tasks]
        bounds = np.cumsum([0, *ranks])
        self.blocks = [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
        n_out, n_in = (int(tasks[0].b.shape[0]), int(tasks[0].a.shape[1])) if tasks else (0, 0)
        self.shape = (n_out, n_in)
        size = int(bounds[-1])
        self.left = torch.empty(n_out, size, dtype=DTYPE, device=device)
        self.right = torch.empty(size, n_in, dtype=DTYPE, device=device)
        self.scales = torch.empty(size, dtype=DTYPE, device=device)
        for task, weight, block in zip(tasks, weights, self.blocks):
            left, right = self.left[:, block], self.right[block]
            left.copy_(task.b)
            right.copy_(task.a)
            norm_b, norm_a = float(torch.linalg.norm(left)), float(torch.linalg.norm(right))
            if norm_b > 0:
                left.div_(norm_b)
            if norm_a > 0:
                right.div_(norm_a)
            self.scales[block] = task.scale * weight * norm_b * norm_a
        self.gram_left = block_gram(self.left, self.blocks)
        self.gram_right = block_gram(self.right.T, self.blocks)
        self._coef_left, self._root_left, top_left = _basis(self.gram_left)
        self._coef_right, self._root_right, top_right = _basis(self.gram_right)
        # round-off of the K × K algebra, relative to the stack's scale: a zero constituent gives
        # singular values of 1e-16 · ‖L‖‖R‖, which are zero, not its spectrum
        largest = float(self.scales.abs().max()) if self.scales.numel() else 0.0
        self.noise = NOISE * largest * (top_left * top_right) ** 0.5

    @property
    def size(self) -> int:
        return int(self.left.shape[1])

    def selector(self, task: int) -> torch.Tensor:
        """The core of constituent ``task`` alone (``L · core · R = wₜ τₜ``)."""
        core = torch.zeros(self.size, self.size, dtype=DTYPE, device=self.left.device)
        block = self.blocks[task]
        core[block, block] = torch.diag(self.scales[block])
        return core

    def sum_core(self) -> torch.Tensor:
        """The core of the weighted sum ``Σ wₜ τₜ``."""
        return torch.diag(self.scales)

    def svd(self, core: torch.Tensor, ref: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Exact-rank SVD of ``L · core · R`` as ``(X_U, s, X_V)``: ``U = L · X_U``, ``V = Rᵀ · X_V``."""
        inner = self._root_left @ core @ self._root_right.T
        if inner.numel() == 0:
            empty = torch.zeros(self.size, 0, dtype=DTYPE, device=self.left.device)
            return empty, torch.zeros(0, dtype=DTYPE, device=self.left.device), empty.clone()
        a, s, b = thin_svd(inner, ref)
        keep = s > self.noise
        return self._coef_left @ a[:, keep], s[keep], self._coef_right @ b[:, keep]

    def svd_of_block(self, columns: torch.Tensor, task: int,
                     ref: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`svd` of a core whose only non-zero columns are constituent ``task``'s block
        (``core[:, block] = columns``, K × rₜ): what one task's SVD and a projected task need.

        ``inner = (root_L · columns) · (root_R[:, block])ᵀ`` has rank ≤ rₜ, so it is factored
        through two thin QR decompositions and the SVD of an rₜ × rₜ matrix instead of a K × K one
        (at K = 160, rₜ = 32: about a tenth of the time); the rank rules are :meth:`svd`'s.
        """
        block = self.blocks[task]
        left = self._root_left @ columns
        right = self._root_right[:, block]
        if left.numel() == 0 or right.numel() == 0:
            empty = torch.zeros(self.size, 0, dtype=DTYPE, device=self.left.device)
            return empty, torch.zeros(0, dtype=DTYPE, device=self.left.device), empty.clone()
        q_left, r_left = torch.linalg.qr(left)
        q_right, r_right = torch.linalg.qr(right)
        a, s, b = thin_svd(r_left @ r_right.T, ref)
        keep = s > self.noise
        return self._coef_left @ (q_left @ a[:, keep]), s[keep], self._coef_right @ (q_right @ b[:, keep])

    def polar_left(self, coef: torch.Tensor) -> torch.Tensor:
        """Coefficients of the polar factor of ``L · coef`` (the partial isometry on its span)."""
        return coef @ _inverse_root(coef.T @ self.gram_left @ coef)

    def polar_right(self, coef: torch.Tensor) -> torch.Tensor:
        """Coefficients of the polar factor of ``Rᵀ · coef``."""
        return coef @ _inverse_root(coef.T @ self.gram_right @ coef)

    def gather(self, coef_left: torch.Tensor, values: torch.Tensor, coef_right: torch.Tensor,
               flat_indices: np.ndarray) -> np.ndarray:
        """``(L · coef_left) diag(values) (Rᵀ · coef_right)ᵀ`` at row-major flat indices (float64)."""
        rows, cols = np.divmod(np.asarray(flat_indices, dtype=np.int64), self.shape[1])
        u = _take(self.left, rows, axis=0) @ coef_left
        v = _take(self.right, cols, axis=1).T @ coef_right
        return ((u * values) * v).sum(dim=1).cpu().numpy()


def block_gram(x: torch.Tensor, blocks: Sequence[slice]) -> torch.Tensor:
    """``XᵀX`` for X's columns in consecutive ``blocks``: the blocks on and above the diagonal, one
    product per block row, mirrored below (about ``(T+1)/2T`` of a general product for T blocks, and
    exactly symmetric)."""
    size = int(x.shape[1])
    out = torch.empty(size, size, dtype=x.dtype, device=x.device)
    for block in blocks:
        if block.start == block.stop:
            continue
        out[block, block.start:] = x[:, block].T @ x[:, block.start:]
        out[block.stop:, block] = out[block, block.stop:].T
        diagonal = out[block, block]
        out[block, block] = torch.triu(diagonal) + torch.triu(diagonal, 1).T
    return out


def _take(x: torch.Tensor, index: np.ndarray, axis: int) -> torch.Tensor:
    """Rows (``axis=0``) or columns (``axis=1``) of ``x``; numpy's ``take`` on the CPU (several times
    faster than torch's indexing for a column gather), torch's indexing on other devices."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.take(x.numpy(), index, axis=axis))
    picked = torch.as_tensor(index, device=x.device)
    return x[picked] if axis == 0 else x[:, picked]


def _inverse_root(gram: torch.Tensor) -> torch.Tensor:
    """``H^{-1/2}`` on the span of a PSD matrix (eigenvalues ≤ RTOL² · max treated as zero)."""
    if gram.numel() == 0:
        return gram
    lam, w = torch.linalg.eigh(gram)
    top = float(lam[-1])
    keep = lam > (RTOL**2) * top if top > 0 else torch.zeros_like(lam, dtype=torch.bool)
    w = w[:, keep]
    return (w / lam[keep].sqrt()) @ w.T


# --------------------------------------------------------------------------------------------------
# One algorithm, two representations: the methods are written once against SpectralSpace.
# --------------------------------------------------------------------------------------------------


class SpectralSpace:
    """What TSV-M, Iso-C and Iso-CTS need: SVDs of each task, of the sum and of projected tasks,
    polar factors of stacked singular vectors, and the result. Singular vectors are opaque "frames"
    (a dense matrix here, coefficients in :class:`FactoredSpace`) that can be sliced and concatenated
    along their second axis."""

    def __init__(self, tasks: Sequence[torch.Tensor], weights: Sequence[float]) -> None:
        self.tasks = [t.to(DTYPE) * w for t, w in zip(tasks, weights)]
        self.shape = (int(self.tasks[0].shape[0]), int(self.tasks[0].shape[1]))

    def task_svd(self, i: int, ref: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return thin_svd(self.tasks[i], ref)

    def sum_svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return thin_svd(sum(self.tasks[1:], self.tasks[0]))

    def projected_svd(self, i: int, basis: torch.Tensor,
                      ref: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """SVD of ``(I − Q Qᵀ) wᵢ τᵢ`` for orthonormal left singular vectors ``basis`` (Q)."""
        t = self.tasks[i]
        return thin_svd(t - basis @ (basis.T @ t), ref)

    def polar_left(self, u: torch.Tensor) -> torch.Tensor:
        return polar(u)

    def polar_right(self, v: torch.Tensor) -> torch.Tensor:
        return polar(v)

    def result(self, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> Factored:
        return Factored(u, s, v)


class FactoredSpace(SpectralSpace):
    """:class:`SpectralSpace` on LoRA factors through a :class:`LowRankFrame`: frames are coefficient
    matrices over the stacked factors, and no out × in matrix is formed."""

    def __init__(self, tasks: Sequence[LowRankDelta], weights: Sequence[float],  # noqa: D107
                 device: torch.device | None = None) -> None:
        self.frame = LowRankFrame(tasks, weights, device)
        self.shape = self.frame.shape

    def task_svd(self, i: int, ref: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.frame.svd_of_block(self.frame.selector(i)[:, self.frame.blocks[i]], i, ref)

    def sum_svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.frame.svd(self.frame.sum_core())

    def projected_svd(self, i: int, basis: torch.Tensor,
                      ref: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # (I − L X Xᵀ Lᵀ) L E = L (E − X Xᵀ (LᵀL) E): the projection is a change of core
        block = self.frame.blocks[i]
        columns = self.frame.selector(i)[:, block]
        columns = columns - basis @ (basis.T @ (self.frame.gram_left @ columns))
        return self.frame.svd_of_block(columns, i, ref)

    def polar_left(self, u: torch.Tensor) -> torch.Tensor:
        return self.frame.polar_left(u)

    def polar_right(self, v: torch.Tensor) -> torch.Tensor:
        return self.frame.polar_right(v)

    def result(self, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> FramedResult:  # type: ignore[override]
        return FramedResult(self.frame, u, s, v)


@dataclass(frozen=True)
class FramedResult:
    """``Δ = (L · X_U) diag(S) (Rᵀ · X_V)ᵀ`` over a :class:`LowRankFrame`."""

    frame: LowRankFrame
    coef_left: torch.Tensor
    S: torch.Tensor
    coef_right: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return self.frame.shape

    def gather(self, flat_indices: np.ndarray) -> np.ndarray:
        return self.frame.gather(self.coef_left, self.S, self.coef_right, flat_indices)

    def dense(self) -> torch.Tensor:
        u = self.frame.left @ self.coef_left
        v = self.frame.right.T @ self.coef_right
        return (u * self.S) @ v.T


def spectral_space(tasks: Sequence[TaskVector], weights: Sequence[float],
                   device: torch.device | None = None) -> SpectralSpace:
    """The factored space when every constituent is low-rank, the dense one otherwise."""
    if all(isinstance(t, LowRankDelta) for t in tasks):
        return FactoredSpace(tasks, weights, device)  # type: ignore[arg-type]
    return SpectralSpace([dense(t) for t in tasks], weights)
