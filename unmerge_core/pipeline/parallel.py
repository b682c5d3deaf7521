"""Module-level parallelism on a few CPU cores, with bounded memory.

Work on dense ΔW modules (forming ``B·A``, magnitude thresholds, top-k scores) is a chain of
memory-bound kernels, several of them single-threaded (``numpy.partition``). Running one module per
core in threads, each kernel on one thread, uses the cores better than running one module at a time
with multi-threaded kernels. Memory stays bounded: at most ``workers`` modules are in flight, and
each worker reuses its own buffers (:class:`BufferPool`).

``UNMERGE_THREADS`` sets the number of workers (default: the CPU count, at most 8).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

MAX_DEFAULT_WORKERS = 8


def worker_count() -> int:
    """Workers for module-level parallelism: ``$UNMERGE_THREADS`` or the CPU count (at most 8)."""
    env = os.environ.get("UNMERGE_THREADS", "").strip()
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            pass
    return max(1, min(os.cpu_count() or 1, MAX_DEFAULT_WORKERS))


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count (restored on exit)."""
    old = torch.get_num_threads()
    if n == old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def thread_map(fn: Callable[[T], R], items: Sequence[T], workers: int | None = None) -> list[R]:
    """``[fn(x) for x in items]`` on ``workers`` threads, results in input order.

    torch, and the BLAS of numpy and SciPy, run single-threaded inside (one core per item): the
    per-module kernels are too small to split, and split kernels spin-wait badly when the cores are
    shared. With one worker (or one
    item) it is a plain loop, still with single-threaded torch: either way every product runs on one
    thread, so results do not depend on the number of workers.
    """
    workers = worker_count() if workers is None else max(1, workers)
    with torch_threads(1), blas_threads(1):
        if workers == 1 or len(items) <= 1:
            return [fn(x) for x in items]
        # each worker sets its own OpenMP thread count too (set_num_threads is per calling thread for
        # OpenMP): otherwise BLAS splits small products over threads in workers but not in the main
        # thread, and the float32 bits of ΔW would depend on how many workers ran
        with ThreadPoolExecutor(max_workers=min(workers, len(items)), initializer=torch.set_num_threads,
                                initargs=(1,)) as pool:
            return list(pool.map(fn, items))


class BufferPool:
    """One reusable float32 buffer per (thread, tag, shape).

    ``get(shape, tag)`` returns the calling thread's buffer of that shape, allocating it once. Memory
    is ``threads × tags × distinct shapes`` buffers, whatever the number of modules processed.
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self, shape: tuple[int, ...], tag: str = "") -> torch.Tensor:
        """The calling thread's buffer for ``(tag, shape)``; ``tag`` tells apart two buffers of one shape."""
        buffers: dict[tuple[str, tuple[int, ...]], torch.Tensor] | None = getattr(self._local, "buffers", None)
        if buffers is None:
            buffers = self._local.buffers = {}
        key = (tag, tuple(int(x) for x in shape))
        buf = buffers.get(key)
        if buf is None:
            buf = buffers[key] = torch.empty(key[1], dtype=torch.float32)
        return buf

    def allocated(self) -> int:
        """Buffers allocated by the calling thread (for tests)."""
        return len(getattr(self._local, "buffers", {}) or {})


@contextmanager
def blas_threads(n: int | None = None) -> Iterator[None]:
    """Limit the BLAS threads of numpy, SciPy and scikit-learn (``threadpoolctl``) for a block.

    Decomposition problems are skinny (≈10⁵ coordinates × ≈10 atoms): multi-threaded BLAS gains
    little on them and loses much when the cores are shared (threads spin-wait for each other).
    ``n`` defaults to ``$UNMERGE_BLAS_THREADS`` or 1. Without ``threadpoolctl`` it does nothing.
    """
    if n is None:
        try:
            n = max(1, int(os.environ.get("UNMERGE_BLAS_THREADS", "1")))
        except ValueError:
            n = 1
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - scikit-learn depends on it
        yield
        return
    with threadpool_limits(limits=n, user_api="blas"):
        yield
