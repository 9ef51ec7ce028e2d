"""Where units of work run: in this process, or as tasks on a Ray cluster (optional extra ``codi-lens[ray]``).

:meth:`codi_lens.run.store.ResultStore.run` hands its batches to an executor and writes each finished
batch as a part, whichever executor computed it, so a Ray run and a local run of the same command
fill the same resumable Parquet dataset: a killed cluster run resumes (locally or on Ray), and the
final tables are the same, row order aside.

Models travel by how they were loaded, not by their weights. When a work function (a closure) that
refers to a :class:`~codi_lens.core.model.CODIModel` is sent to a Ray task, the model is serialised as its
``source`` (:class:`~codi_lens.loading.LoadSpec`); on the worker it becomes that worker's own copy, loaded once per
worker process and reused by every later task (one model per worker). The worker checks the
checkpoint's SHA-256 against the driver's. A model that was not loaded from files (built in memory),
or whose state was changed after loading, cannot be rebuilt this way: the first is refused with a
:class:`DistributedError`; the second is the caller's to avoid (hooks added with ``add_hook`` or
weights edited in place are not carried; interventions passed as ``fwd_hooks`` are).

A worker that dies mid-task (killed, out of memory) has its task retried by Ray on another worker
(``max_retries``), and a batch is written by the driver only when its task returned, so nothing is
lost or written twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, TypeVar

import pandas as pd

from codi_lens.core.errors import CodiLensError
from codi_lens.core.model import CODIModel, ModelSource

Unit = TypeVar("Unit")
Work = Callable[[list[Any]], pd.DataFrame]

RAY_HINT = "install the extra: pip install 'codi-lens[ray]' (or pip install -e '.[ray]' in a checkout)"


class DistributedError(CodiLensError, RuntimeError):
    """Ray is missing, cannot be reached, or was asked to ship something it cannot rebuild."""


class Executor(Protocol):
    """Computes ``work(batch)`` for each batch, yielding ``(batch index, rows)`` as batches finish;
    ``in_process``: whether the work runs in this process (so it can report progress as it goes)."""

    in_process: bool

    def map(self, work: Work, batches: Sequence[list[Any]]) -> Iterator[tuple[int, pd.DataFrame]]: ...


class PlanShown(Exception):  # noqa: N818 (not an error: how a dry run ends)
    """A dry run computed its first batch (kept in the output folder), printed the estimate and stopped."""


class FirstBatchOnly:
    """``--dry-run``: the first batch of the first sweep on ``inner``, then :class:`PlanShown` (the batch is
    written like any other, so the full run continues from it)."""

    def __init__(self, inner: Executor):
        self.inner = inner
        self.in_process = inner.in_process

    def map(self, work: Work, batches: Sequence[list[Any]]) -> Iterator[tuple[int, pd.DataFrame]]:
        yield from self.inner.map(work, batches[:1])
        if batches:
            raise PlanShown


class LocalExecutor:
    """Every batch in this process, in order."""

    in_process = True

    def map(self, work: Work, batches: Sequence[list[Any]]) -> Iterator[tuple[int, pd.DataFrame]]:
        for index, batch in enumerate(batches):
            yield index, work(batch)


# ---------------------------------------------------------------------- the worker side
_worker_model: tuple[ModelSource, CODIModel] | None = None


def _model_for_spec(spec: ModelSource) -> CODIModel:
    """This worker process's model for ``spec``, loaded on first use (one model per worker: a task
    for another model replaces it)."""
    global _worker_model
    if _worker_model is None or _worker_model[0] != spec:
        _worker_model = None  # free the old model before loading the new one
        _worker_model = (spec, spec.load())
    return _worker_model[1]


def _spec_of(model: CODIModel) -> ModelSource:
    if model.source is None:
        raise DistributedError(
            "a model built in memory (not by load_codi/load_pretrained) cannot be sent to Ray workers: "
            "they rebuild each model from its checkpoint file; save it and load it with load_codi"
        )
    return model.source


def _run_batch(work: Work, batch: list[Any]) -> pd.DataFrame:
    return work(batch)


# ---------------------------------------------------------------------- the driver side
def _import_ray():
    try:
        import ray
    except ImportError:
        raise DistributedError(f"--ray needs Ray, which is not installed; {RAY_HINT}") from None
    return ray


class RayExecutor:
    """Batches as Ray tasks, one model per worker process.

    Args:
        address: ``"local"`` starts a Ray instance on this machine (``num_cpus`` CPUs, default all);
            anything else is the address of a running cluster (``"auto"``, ``"ray://host:10001"``,
            ``"host:6379"``). If Ray is already initialised in this process it is used as it is.
        cpus_per_task, gpus_per_task: resources each task requests (default: 1 CPU, and 1 GPU when
            ``device`` is CUDA, else none).
        max_retries: how often Ray reruns a task whose worker died.
        max_in_flight: tasks submitted but not yet collected (default: twice the cluster's CPUs / task).
    """

    in_process = False

    def __init__(
        self,
        address: str = "local",
        *,
        device: str = "cpu",
        num_cpus: int | None = None,
        cpus_per_task: float = 1,
        gpus_per_task: float | None = None,
        max_retries: int = 3,
        max_in_flight: int | None = None,
    ):
        ray = _import_ray()
        self.ray = ray
        if not ray.is_initialized():
            try:
                if address == "local":
                    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
                else:
                    ray.init(address=address, log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise DistributedError(f"--ray {address}: could not start or join a Ray cluster: {exc}") from None
        ray.util.register_serializer(CODIModel, serializer=_spec_of, deserializer=_model_for_spec)
        if gpus_per_task is None:
            gpus_per_task = 1 if str(device).startswith("cuda") else 0
        self.options = {"num_cpus": cpus_per_task, "num_gpus": gpus_per_task, "max_retries": max_retries}
        cluster_cpus = ray.cluster_resources().get("CPU", 1)
        self.max_in_flight = max_in_flight or max(1, int(2 * cluster_cpus / max(cpus_per_task, 1e-9)))
        self._task = ray.remote(_run_batch)

    def map(self, work: Work, batches: Sequence[list[Any]]) -> Iterator[tuple[int, pd.DataFrame]]:
        ray = self.ray
        task = self._task.options(**self.options)
        try:
            work_ref = ray.put(work)  # serialised once (models become their LoadSpec), shared by every task
        except Exception as exc:  # Ray wraps errors raised while serialising; surface ours as they are
            cause = exc
            while cause is not None and not isinstance(cause, DistributedError):
                cause = cause.__cause__ or cause.__context__
            raise (cause or exc) from None
        pending: dict[Any, int] = {}
        next_batch = 0
        try:
            while pending or next_batch < len(batches):
                while next_batch < len(batches) and len(pending) < self.max_in_flight:
                    pending[task.remote(work_ref, batches[next_batch])] = next_batch
                    next_batch += 1
                (ready,), _ = ray.wait(list(pending), num_returns=1)
                yield pending.pop(ready), ray.get(ready)
        finally:
            for ref in pending:  # an error, or the caller stopped: do not leave work running
                ray.cancel(ref)


def make_executor(ray_address: str | None, *, device: str = "cpu", **options: Any) -> Executor:
    """The executor a ``--ray`` flag names: None -> :class:`LocalExecutor`, else :class:`RayExecutor`."""
    if ray_address is None:
        return LocalExecutor()
    return RayExecutor(ray_address, device=device, **options)
