"""Units of work as Ray tasks (``executor = { kind = "ray" }``; ``pip install 'unmerge[ray]'``).

Every unit the runner hands an executor (train one adapter, merge one target, one adapter's merge
statistics, one decomposition) is a picklable function and argument that writes its artifact into
the store atomically and returns its path. :class:`RayExecutor` submits each as a Ray task with the
manifest's resources and gathers the results in submission order, so a run gives the same files as
with the local executor. Because the store is the only thing units share:

- the store must be on storage every Ray node mounts at the same path; this is checked before the
  first unit runs, on every node (one line naming the node, not a hang or a missing file later);
- a unit whose worker dies is rerun by Ray (``max_retries``); a unit that finished before the crash
  is not redone, by Ray or by a rerun of ``unmerge run``, since its artifact is already in the store;
- an error a unit raises (a plugin's one-line error, a bad input) reaches the driver as the same
  exception, so the command line prints the same line as locally.
"""

from __future__ import annotations

import gc
import os
import socket
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from tqdm.auto import tqdm

from unmerge_core.errors import UnmergeError
from unmerge_core.pipeline.executor import PlainProgress, Progress, progress_style, unit_name

T = TypeVar("T")
R = TypeVar("R")


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UnmergeError("executor.kind = 'ray' needs Ray: pip install 'unmerge[ray]'") from None
    return ray


def numeric_settings() -> dict[str, Any]:
    """What decides the float bits of a unit's results in this process, beside its inputs: torch's
    intra-op threads, the BLAS libraries' threads, float32 matmul precision (TF32) and deterministic
    algorithms. A Ray worker starts with others (Ray sets ``OMP_NUM_THREADS`` to the task's CPUs)."""
    import torch

    try:
        from threadpoolctl import threadpool_info
        blas = {i["prefix"]: i["num_threads"] for i in threadpool_info() if i.get("user_api") == "blas"}
    except ImportError:  # pragma: no cover - scikit-learn depends on it
        blas = {}
    return {"torch_threads": torch.get_num_threads(), "blas_threads": blas,
            "matmul_precision": torch.get_float32_matmul_precision(),
            "cuda_matmul_tf32": torch.backends.cuda.matmul.allow_tf32, "cudnn_tf32": torch.backends.cudnn.allow_tf32,
            "deterministic": torch.are_deterministic_algorithms_enabled()}


@contextmanager
def applied_settings(settings: dict[str, Any] | None) -> Iterator[None]:
    """Run a block with the driver's :func:`numeric_settings` (restored afterwards: workers are reused)."""
    if not settings:
        yield
        return
    import torch

    old = numeric_settings()
    torch.set_num_threads(settings["torch_threads"])
    torch.set_float32_matmul_precision(settings["matmul_precision"])
    torch.backends.cuda.matmul.allow_tf32 = settings["cuda_matmul_tf32"]
    torch.backends.cudnn.allow_tf32 = settings["cudnn_tf32"]
    torch.use_deterministic_algorithms(settings["deterministic"])
    try:
        from threadpoolctl import threadpool_limits
        limits = threadpool_limits(limits=settings["blas_threads"]) if settings["blas_threads"] else None
    except ImportError:  # pragma: no cover
        limits = None
    try:
        yield
    finally:
        if limits is not None:
            limits.restore_original_limits()
        torch.set_num_threads(old["torch_threads"])
        torch.set_float32_matmul_precision(old["matmul_precision"])
        torch.backends.cuda.matmul.allow_tf32 = old["cuda_matmul_tf32"]
        torch.backends.cudnn.allow_tf32 = old["cudnn_tf32"]
        torch.use_deterministic_algorithms(old["deterministic"])


def _run_unit(fn: Callable[[Any], Any], job: Any, settings: dict[str, Any] | None = None) -> Any:
    """One unit in a Ray worker, with the driver's numeric settings (:func:`numeric_settings`): a unit's
    artifact must not depend on which executor made it, since both store it under one key. The worker
    process is reused, so GPU memory is handed back after it."""
    try:
        with applied_settings(settings):
            return fn(job)
    finally:
        gc.collect()
        torch = __import__("sys").modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()


CONNECT_TIMEOUT_S = 10.0
"""How long ``connect`` waits for a cluster's address to answer (Ray itself retries for minutes, silently)."""


def _check_reachable(address: str | None, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """A ``host:port`` (or ``ray://host:port``) address must accept a TCP connection within ``timeout``;
    ``None`` (start Ray here) and ``auto`` are left to Ray."""
    if not address or address == "auto":
        return
    where = address.removeprefix("ray://")
    host, sep, port = where.rpartition(":")
    if not sep or not port.isdigit():
        return  # not host:port: Ray's own error
    host = host.strip("[]") or "127.0.0.1"
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        reason = "no answer" if isinstance(exc, (TimeoutError, socket.timeout)) else (exc.strerror or type(exc).__name__)
        raise UnmergeError(f"executor: cannot join Ray at {address}: {reason.lower()} from {host}:{port} within "
                           f"{timeout:g} s (is the cluster's head node running there?)") from None


def _sees_store(store: str, token: str) -> tuple[str, bool]:
    """On a worker: its host name and whether the driver's probe file is visible at the same path."""
    return socket.gethostname(), (Path(store) / token).is_file()


class RayExecutor:
    """Runs units as Ray tasks; results in submission order.

    Args:
        store_root: The artifact store every unit writes to (checked to be visible from every node).
        address: ``None`` starts Ray on this machine; ``"auto"`` or ``"ray://host:port"`` joins a cluster.
        num_cpus_per_task, num_gpus_per_task: Resources Ray reserves for each unit.
        max_retries: Times a unit whose worker died is rerun.
        progress: Show a progress bar per stage (``"lines"``: plain progress lines, :class:`PlainProgress`).
    """

    def __init__(self, store_root: Path, *, address: str | None = None, num_cpus_per_task: float = 1.0,
                 num_gpus_per_task: float = 0.0, max_retries: int = 3, progress: Progress = True) -> None:
        self.store_root = Path(store_root).resolve()
        self.address = address
        self.resources = {"num_cpus": num_cpus_per_task, "num_gpus": num_gpus_per_task}
        self.max_retries = max_retries
        self.progress = progress
        self._checked = False

    def connect(self) -> Any:
        """Ray, initialised (once per process) and checked to see the store from every node."""
        ray = _ray()
        if not ray.is_initialized():
            _check_reachable(self.address)
            try:
                ray.init(address=self.address, include_dashboard=False, log_to_driver=False,
                         configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = self.address or "this machine"
                raise UnmergeError(f"executor: cannot start or join Ray at {where}: "
                                   f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        if not self._checked:
            self._check_resources(ray)
            self._check_store(ray)
            self._checked = True
        return ray

    def _check_resources(self, ray: Any) -> None:
        """A unit asking more than any node has would wait forever (Ray calls it infeasible): refuse it."""
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        for key, resource in (("num_cpus", "CPU"), ("num_gpus", "GPU")):
            wanted = self.resources[key]
            largest = max((float(n.get(resource, 0.0)) for n in nodes), default=0.0)
            if wanted > largest:
                raise UnmergeError(f"executor.{key}_per_task = {wanted:g}, but no Ray node has more than "
                                   f"{largest:g} {resource}: every unit would wait forever")

    def _check_store(self, ray: Any) -> None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.store_root.mkdir(parents=True, exist_ok=True)
        token = f".ray-probe-{uuid.uuid4().hex}"
        (self.store_root / token).write_text(str(os.getpid()))
        try:
            probe = ray.remote(_sees_store)
            nodes = [n for n in ray.nodes() if n.get("Alive")]
            refs = [probe.options(num_cpus=0,
                                  scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                    .remote(str(self.store_root), token) for n in nodes]
            ready, pending = ray.wait(refs, num_returns=len(refs), timeout=120)
            if pending:
                raise UnmergeError(f"executor: {len(pending)} Ray node(s) did not answer within 120 s whether they "
                                   f"see the artifact store {self.store_root}")
            for host, seen in ray.get(ready):
                if not seen:
                    raise UnmergeError(f"executor: Ray node {host} cannot see the artifact store {self.store_root}: "
                                       "put output.store (or output.dir) on storage every node mounts at this path")
        finally:
            (self.store_root / token).unlink(missing_ok=True)

    def map(self, fn: Callable[[T], R], jobs: Sequence[T], *, desc: str) -> list[R]:
        if not jobs:
            return []
        ray = self.connect()
        task = ray.remote(_run_unit).options(max_retries=self.max_retries, retry_exceptions=False, **self.resources)
        settings = numeric_settings()  # as the local executor would run them, here and now
        refs = [task.remote(fn, job, settings) for job in jobs]
        order = {ref: i for i, ref in enumerate(refs)}
        lines = (PlainProgress(f"{desc} [ray]", len(refs), unit_seconds=False)
                 if progress_style(self.progress) == "lines" else None)
        bar = tqdm(total=len(refs), desc=f"{desc} [ray]", unit="job", leave=False, dynamic_ncols=True,
                   disable=progress_style(self.progress) != "bar")
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                bar.update(len(done))
                if lines is not None:
                    for ref in done:
                        lines.done(unit_name(jobs[order[ref]]))
                try:
                    ray.get(done)
                except ray.exceptions.RayError:
                    # the error the local executor would raise: the first failing unit in submission order
                    first = order[done[0]]
                    for ref in refs[first + 1:]:
                        ray.cancel(ref)
                    for ref in refs[:first + 1]:
                        self._get(ray, ref, desc)
            return [self._get(ray, ref, desc) for ref in refs]
        finally:
            bar.close()

    def _get(self, ray: Any, ref: Any, desc: str) -> Any:
        """A unit's result, or its error as the exception the unit raised (one line, as locally)."""
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, BaseException):
                raise cause from None
            raise UnmergeError(f"executor: a Ray task failed: {str(exc).splitlines()[0]}") from None
        except ray.exceptions.WorkerCrashedError:
            raise UnmergeError(f"executor: a Ray worker died {self.max_retries + 1} time(s) running a unit of "
                               f"'{desc}' (executor.max_retries = {self.max_retries}); rerun to resume") from None
        except ray.exceptions.RayError as exc:
            raise UnmergeError(f"executor: Ray failed running '{desc}': {type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''}; rerun to resume") from None
