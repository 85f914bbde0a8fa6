"""``medpipe score --dask local:N | tcp://HOST:PORT``: one task per study on Dask workers.

The driver (the ``medpipe score`` process) ingests, plans the studies, skips those already scored (the
status table), and submits one task per remaining study; each Dask worker holds one
:class:`~medpipe.scoring.engine.StudyScorer` (the model loaded once per worker, by a worker plugin:
:class:`ScorerPlugin`, which Dask also runs on workers that join or are restarted later). A task reads and
preprocesses its study, infers, writes the study's DICOM results into ``OUT/results`` and returns the
study's row; the driver alone records the rows (``score_status.sqlite``, then ``scores.csv``), in the order
they finish, so SQLite keeps a single writer. Failure isolation, resume and the outputs are those of the
single-machine path: the same per-study code, the same row for a failure, the same UIDs, and the results'
content time chosen once by the driver.

* ``local:N``: a :class:`distributed.LocalCluster` of N worker processes (one thread each) on 127.0.0.1,
  without dashboard, started for the run and closed after it; each worker gets ``cpu_threads`` torch threads
  (default: the CPU cores divided by N).
* ``tcp://HOST:PORT``: a running scheduler (``dask scheduler``, ``dask worker tcp://HOST:PORT``, or a
  cluster manager such as dask-jobqueue / dask-kubernetes). Its workers must see the source, the model
  package and ``OUT`` under the same paths (a shared file system) and have medpipe installed.

A worker that dies (killed, out of memory) loses its running study; the scheduler gives it to another
worker (a worker is replaced by its nanny, and the plugin loads the model on the new one). A study whose
workers died ``distributed.scheduler.allowed-failures`` times (Dask's default: 3) is recorded ``failed``
with the reason, and the run goes on. Losing the scheduler stops the run with one line; the studies
finished so far are recorded, and running the same command again scores the rest.

At most twice as many studies as the workers have threads are in flight at a time, so the scheduler
and the driver hold a bounded amount of work however large the cohort is.

Dask is an optional dependency: ``pip install 'medpipe[dask]'``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medpipe.errors import ConfigError, MedpipeError

try:
    from distributed import WorkerPlugin
except ImportError:  # the optional dependency is missing: a run that asks for Dask says so (_distributed)
    WorkerPlugin = object

log = logging.getLogger("medpipe.score")

#: seconds to wait for a tcp:// scheduler to answer
CONNECT_TIMEOUT = 30


def parse_spec(spec: str) -> tuple[str, int | str]:
    """``("local", N)`` or ``("tcp", "tcp://HOST:PORT")``.

    Raises:
        ConfigError: anything else.
    """
    text = spec.strip()
    if text.startswith("local:"):
        n = text[len("local:"):]
        if n.isdigit() and 1 <= int(n) <= 1024:
            return "local", int(n)
    elif text.startswith("tcp://") and text.rsplit(":", 1)[-1].isdigit() and len(text) > len("tcp://"):
        return "tcp", text
    raise ConfigError(f"--dask {spec}: expected local:N (N worker processes on this machine, 1-1024) or "
                      "tcp://HOST:PORT (a running Dask scheduler)")


def _distributed() -> Any:
    try:
        import distributed
    except ImportError:
        raise ConfigError("--dask needs Dask's distributed scheduler, an optional dependency",
                          hint="pip install 'medpipe[dask]'") from None
    return distributed


class ScorerPlugin(WorkerPlugin):  # type: ignore[misc, valid-type]
    """Sets up one scorer per worker, ``factory(package, out, options, builder_args, created)`` (the engine's
    :class:`~medpipe.scoring.engine.StudyScorer`): the model loaded once per worker."""

    def __init__(self, factory: Callable[..., Any], model_dir: str, out: str, options: Any, builder_args: Any,
                 created: Any, threads: int | None) -> None:
        self.factory, self.model_dir, self.out, self.options = factory, model_dir, out, options
        self.builder_args, self.created, self.threads = builder_args, created, threads
        self.scorer: Any = None

    def setup(self, worker: Any) -> None:
        from medpipe.inference.package import ModelPackage

        if self.threads is not None:
            import torch

            torch.set_num_threads(self.threads)
        self.scorer = self.factory(ModelPackage.load(self.model_dir), Path(self.out), self.options,
                                   self.builder_args, self.created)

    def teardown(self, worker: Any) -> None:
        self.scorer = None


def score_study_task(plugin_name: str, job: Any) -> tuple[dict[str, Any], dict[str, float]]:
    """One Dask task: the study's row and stage times, by this worker's scorer."""
    from distributed import get_worker

    plugin = get_worker().plugins[plugin_name]
    return plugin.scorer.score(job)  # type: ignore[no-any-return]


def _connect(spec: str, threads: int | None) -> tuple[Any, Callable[[], None], int | None]:
    """(client, close, torch threads per worker) for a ``--dask`` spec."""
    distributed = _distributed()
    kind, value = parse_spec(spec)
    if kind == "local":
        n = int(value)
        # loopback only; no dashboard (the scheduler's own small HTTP server takes any free loopback port)
        cluster = distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1",
                                           dashboard_address=None, silence_logs=logging.ERROR,
                                           scheduler_kwargs={"dashboard": False, "dashboard_address": "127.0.0.1:0"})
        client = distributed.Client(cluster)

        def close() -> None:
            client.close()
            cluster.close()

        return client, close, threads or max(1, (os.cpu_count() or 1) // n)
    try:
        client = distributed.Client(str(value), timeout=CONNECT_TIMEOUT)
    except (OSError, TimeoutError) as exc:
        raise ConfigError(f"--dask {value}: cannot reach the Dask scheduler ({type(exc).__name__}: {exc})",
                          hint="start it (dask scheduler; dask worker ADDRESS) or check the address") from None
    return client, client.close, threads


def run_on_dask(spec: str, todo: list[Any], package: Any, out: Path, options: Any, builder_args: Any, created: Any,
                finish: Callable[[Any, dict[str, Any], dict[str, float]], None], timer: Any, *,
                scorer: Callable[..., Any], failed_row: Callable[[Any, str], dict[str, Any]]) -> None:
    """Score ``todo`` on the Dask cluster of ``spec``; ``finish(job, row, times)`` records each study (driver).

    ``scorer``: makes a worker's per-study scorer (the engine's ``StudyScorer``); ``failed_row(job, reason)``: the
    row of a study whose workers died (passed in: the engine imports this module, not the other way round).
    """
    import hashlib

    distributed = _distributed()

    t0 = time.perf_counter()
    client, close, threads = _connect(spec, options.cpu_threads)
    name = "medpipe-score-" + hashlib.sha256(f"{package.id}\0{out}".encode()).hexdigest()[:16]
    try:
        plugin = ScorerPlugin(scorer, str(package.path), str(out), options, builder_args, created, threads)
        try:
            client.register_plugin(plugin, name=name)
        except MedpipeError as exc:
            raise type(exc)(f"a Dask worker cannot set up the model: {exc}", hint=exc.hint) from None
        except Exception as exc:  # noqa: BLE001 - e.g. CUDA missing on a worker, medpipe not installed there
            raise MedpipeError(f"a Dask worker cannot set up the model ({type(exc).__name__}: "
                               f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''})"[:300]) from None
        timer.add("start_cluster", time.perf_counter() - t0)
        log.info("scoring %d studies on Dask (%s): %d workers", len(todo), spec, len(client.nthreads()))
        _submit_all(client, distributed, name, todo, finish, failed_row)
    finally:
        try:
            if client.status == "running":
                client.unregister_worker_plugin(name)
        except Exception:  # noqa: BLE001 - the cluster may be gone already; nothing to free then
            pass
        close()


def _submit_all(client: Any, distributed: Any, name: str, todo: list[Any],
                finish: Callable[[Any, dict[str, Any], dict[str, float]], None],
                failed_row: Callable[[Any, str], dict[str, Any]]) -> None:
    pending = iter(todo)
    running: dict[Any, Any] = {}
    window = 2

    def top_up() -> None:
        while len(running) < window:
            job = next(pending, None)
            if job is None:
                return
            fut = client.submit(score_study_task, name, job, key=f"medpipe-study-{job.fingerprint[:24]}", pure=False)
            running[fut] = job
            queue.add(fut)

    def resize() -> int:
        return max(2, 2 * sum(client.nthreads().values()))

    window = resize()
    queue = distributed.as_completed()
    top_up()
    for done_count, fut in enumerate(queue, start=1):
        job = running.pop(fut)
        try:
            row, times = fut.result()
        except distributed.KilledWorker as exc:
            row, times = failed_row(job, f"the Dask workers scoring it died ({type(exc).__name__}); out of "
                                         "memory?"), {}
        except (distributed.client.FutureCancelledError, OSError) as exc:
            raise MedpipeError(f"lost the Dask scheduler while scoring ({type(exc).__name__}: {exc})"[:300],
                               hint="the studies finished so far are recorded; run the same command again to "
                                    "score the rest") from None
        except Exception as exc:  # noqa: BLE001 - one study's failure never stops the run
            text = str(exc).strip().splitlines()
            row, times = failed_row(job, f"scoring task failed: {type(exc).__name__}: "
                                         f"{text[0] if text else ''}"[:300]), {}
        finish(job, row, times)
        fut.release()
        if done_count % 32 == 0:
            window = resize()
        top_up()
