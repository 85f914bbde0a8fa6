"""Score every study of a DICOM export with one model: loaded once, reading, inference and writing overlapped.

::

    SRC (folder / zip / DICOMDIR, or an ingest output folder)
      -> ingest (incremental; reused when SRC is an ingest folder)
      -> per study: the model's channel rules pick its series (a study without a match is ``skipped``)
      -> read + preprocess (reader threads, ``prefetch`` studies ahead)
      -> inference (this thread, the model loaded once)
      -> DICOM SEG / SR / Parametric Map / Secondary Capture, NIfTI (writer threads)
      -> ``scores.csv`` and the status table

Reading, inference and writing of different studies run at the same time: while the network works on
study *k*, the readers load and transform *k+1..k+prefetch* and the writers encode *k-1*. Queues are
bounded, so memory stays flat in the number of studies. The libraries doing the work (nibabel's
zlib, numpy, torch, highdicom's bit packing) release the GIL for their heavy parts, so threads give
real overlap without copying volumes between processes.

The per-study work (read + preprocess, infer, write) is :class:`StudyScorer`, set up once per process with
the model loaded once; :func:`_execute` is the one place that chooses who runs it: this process's threads
(the default, above), or with ``ScoreOptions.dask`` one task per study on Dask workers, each worker holding
its own :class:`StudyScorer` (:mod:`medpipe.scoring.dask`). The driver (this process) alone writes
``scores.csv`` and the status table, so resume and failure isolation are the same either way.

Failure isolation: whatever goes wrong with one study (unreadable pixels, a channel missing, out of
memory, a bug) makes that study ``failed`` with a one-line reason; the run goes on and returns normally.
Every output is written atomically and a study's status row is written after its outputs, so a killed
run leaves no half-written file, and running again finishes the job without duplicates (the UIDs of
new objects derive from the model id and the source UIDs, so a re-scored study gives the same objects).
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from medpipe.data.channels import Candidate, StudySkipped
from medpipe.inference.package import ModelPackage, PackageError
from medpipe.io import remove_stale_temporaries, write_csv_atomic
from medpipe.scoring.status import ScoreStatus

log = logging.getLogger("medpipe.score")

SCORES_CSV = "scores.csv"
STATUS_DB = "score_status.sqlite"
LOAD_TRANSFORMS = ("LoadImaged", "LoadImage", "EnsureChannelFirstd", "EnsureChannelFirst")


@dataclass
class ScoreOptions:
    device: str = "auto"
    tta: bool | None = None  # None: the model package's setting
    explain: bool = False  # also a saliency map as Parametric Map + Secondary Capture
    nifti: bool = False  # also the mask (or map) as NIfTI on the ingest grid
    seg_type: Literal["binary", "labelmap"] = "binary"
    readers: int = 1  # threads reading + preprocessing studies ahead
    writers: int = 1  # threads writing results
    prefetch: int = 2  # studies read ahead of the one being inferred
    cpu_threads: int | None = None  # torch CPU threads for inference (None: torch's default)
    ingest_workers: int | None = None
    #: the results' content date and time (None: when scoring starts); fixed, a re-run writes identical files
    created: datetime.datetime | None = None
    #: None: this process (threads); ``local:N`` (N worker processes on this machine) or ``tcp://HOST:PORT`` (a
    #: running Dask scheduler): one task per study on Dask workers (:mod:`medpipe.scoring.dask`)
    dask: str | None = None


@dataclass
class StudyJob:
    patient_id: str
    study_uid: str
    candidates: list[Candidate]
    fingerprint: str


@dataclass
class ScoreReport:
    out: Path
    model_id: str
    rows: list[dict[str, Any]]
    n_scored: int  # scored in this run
    n_reused: int  # already done (same model, same inputs)
    #: wall (all), ingest, scoring (wall after ingest), load_model, and read / preprocess / infer / write
    #: summed over studies (threads overlap them, so their sum can exceed the scoring wall time)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rows:
            out[r["status"]] = out.get(r["status"], 0) + 1
        return out


ProgressFn = Callable[[str, int], Any]


def fingerprint(model_id: str, cands: list[Candidate]) -> str:
    """What a study's result depends on: the model and every candidate volume (path, size, mtime) and sidecar."""
    h = hashlib.sha256(model_id.encode())
    for c in sorted(cands, key=lambda c: str(c.path)):
        for p in (Path(c.path), _sidecar_of(Path(c.path))):
            try:
                st = p.stat()
                h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
            except OSError:
                h.update(f"{p}\0missing\0".encode())
    return h.hexdigest()


def _sidecar_of(volume: Path) -> Path:
    name = volume.name
    stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else volume.stem
    return volume.with_name(stem + ".json")


def resolve_source(src: Path, out: Path, workers: int | None, progress: Any = None) -> Path:
    """The ingest folder to score: ``src`` itself when it is one, else ``out/ingest`` after ingesting ``src``."""
    if str(src).lower().startswith("pacs:"):  # Path("pacs://X?q") reads "pacs:/X?q"; the pull is medpipe.pacs's job
        from medpipe.errors import SourceError

        raise SourceError(f"{src}: a PACS query is pulled first (medpipe.pacs.source.pull_source), then scored",
                          hint="use `medpipe score pacs://NODE?...`, which does both")
    src = src.expanduser()
    if (src / "catalog.sqlite").is_file() and (src / "manifest.csv").is_file():
        return src.resolve()
    from medpipe.ingest import ingest

    target = out / "ingest"
    ingest(src, target, workers=workers, progress=progress)
    return target.resolve()


def plan(ingest_dir: Path, package: ModelPackage, work_dir: Path) -> tuple[list[StudyJob], Any]:
    """The studies of an ingest folder as jobs, and the builder that turns one into a model input."""
    from medpipe.data.channels import ChannelRule
    from medpipe.data.datalist_builder import DatalistBuilder

    rules_doc = package.inputs.get("channel_rules")
    if not rules_doc:
        raise PackageError(f"model {package.name} has no DICOM channel rules (it was trained on files, e.g. a "
                           "MedMNIST import): it cannot pick series from DICOM studies",
                           hint="score it with evaluate_classifier / predict on a datalist instead")
    rules = {name: ChannelRule.model_validate(r) for name, r in rules_doc.items()}
    order = list(package.inputs.get("channels") or rules)
    rules = {name: rules[name] for name in order}
    reference = str(package.inputs.get("reference") or order[-1])
    builder = DatalistBuilder(ingest_dir, rules, reference, None, work_dir=work_dir, log=log)
    studies = builder.studies()
    builder.close()
    jobs = [StudyJob(p, s, cands, fingerprint(package.id, cands)) for (p, s), cands in sorted(studies.items())]
    return jobs, (ingest_dir, rules, reference)


class _Timer:
    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self.lock = threading.Lock()

    def add(self, key: str, seconds: float) -> None:
        with self.lock:
            self.totals[key] = self.totals.get(key, 0.0) + seconds


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def score(src: Path | str, model: Path | str | ModelPackage, out: Path | str, options: ScoreOptions | None = None,
          *, progress: ProgressFn | None = None, ingest_progress: Any = None,
          on_study: Callable[[dict[str, Any]], None] | None = None) -> ScoreReport:
    """Score every study of ``src`` with the model package ``model`` into ``out``.

    Raises:
        PackageError: the model folder is not a usable package.
        SourceError / CatalogError: ``src`` cannot be read at all.
    """
    options = options or ScoreOptions()
    package = model if isinstance(model, ModelPackage) else ModelPackage.load(model)
    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    t_wall = time.perf_counter()
    ingest_dir = resolve_source(Path(src), out, options.ingest_workers, ingest_progress)
    t_scoring = time.perf_counter()
    jobs, builder_args = plan(ingest_dir, package, out / "inputs")
    status = ScoreStatus(out / STATUS_DB)
    rows: dict[str, dict[str, Any]] = {}
    todo: list[StudyJob] = []
    for job in jobs:
        done = status.done(job.study_uid, package.id, job.fingerprint)
        if done is not None:
            rows[job.study_uid] = done
        else:
            todo.append(job)
    n_reused = len(rows)
    log.info("%d studies: %d to score, %d already scored with model %s", len(jobs), len(todo), n_reused,
             package.version)
    timer = _Timer()
    if todo:
        _execute(todo, package, out, options, builder_args, status, rows, timer, progress, on_study)
    status.close()
    ordered = [rows[j.study_uid] for j in jobs if j.study_uid in rows]
    write_csv_atomic(out / SCORES_CSV, ordered, _columns(ordered))
    end = time.perf_counter()
    seconds = {"wall": end - t_wall, "ingest": t_scoring - t_wall, "scoring": end - t_scoring, **timer.totals}
    return ScoreReport(out, package.id, ordered, len(todo), n_reused, seconds)


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    first = ["patient_id", "study_uid", "status", "reason", "series_used"]
    rest: list[str] = []
    for r in rows:
        for k in r:
            if k not in first and k not in rest:
                rest.append(k)
    tail = [k for k in ("model_id", "seconds") if k in rest]
    return first + [k for k in rest if k not in tail] + tail


def _execute(todo: list[StudyJob], package: ModelPackage, out: Path, options: ScoreOptions, builder_args: Any,
             status: ScoreStatus, rows: dict[str, dict[str, Any]], timer: _Timer, progress: ProgressFn | None,
             on_study: Callable[[dict[str, Any]], None] | None) -> None:
    """Score ``todo``: the one place that chooses who runs the studies. By default this process (the model
    loaded once; reader, inference and writer threads overlapped); with ``options.dask`` one task per study on
    Dask workers (:mod:`medpipe.scoring.dask`, the model loaded once per worker). Either way this process alone
    records each finished study (status table, ``rows``) in the order studies finish."""
    import datetime as dt

    created = (options.created or dt.datetime.now()).replace(microsecond=0)  # one content time for the whole run
    bar = progress("Scoring", len(todo)) if progress else None
    advance = bar.__enter__() if bar is not None else (lambda n=1: None)

    def finish(job: StudyJob, row: dict[str, Any], times: dict[str, float]) -> None:
        row.setdefault("model_id", package.id)
        row["seconds"] = round(row.get("seconds", 0.0), 3)
        rows[job.study_uid] = row
        status.record(job.study_uid, package.id, job.fingerprint, row["status"], row)
        for key, seconds in times.items():
            timer.add(key, seconds)
        if on_study:
            on_study(row)
        advance(1)

    try:
        if options.dask:
            from medpipe.scoring.dask import run_on_dask

            run_on_dask(options.dask, todo, package, out, options, builder_args, created, finish, timer,
                        scorer=StudyScorer, failed_row=failed_row)
        else:
            with _torch_threads(options.cpu_threads):
                scorer = StudyScorer(package, out, options, builder_args, created)
                timer.add("load_model", scorer.load_seconds)
                _run_threads(todo, scorer, options, finish)
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)


class _torch_threads:
    def __init__(self, n: int | None) -> None:
        self.n = n
        self.before: int | None = None

    def __enter__(self) -> None:
        if self.n is not None:
            import torch

            self.before = torch.get_num_threads()
            torch.set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        if self.before is not None:
            import torch

            torch.set_num_threads(self.before)


@dataclass
class _Prepared:
    job: StudyJob
    item: dict[str, Any] | None = None
    data: Any = None
    grid: Any = None
    skipped: str | None = None
    failed: str | None = None
    seconds: float = 0.0
    #: this study's stage times (read, preprocess, infer, write), summed into the report by whoever runs it
    times: dict[str, float] = field(default_factory=dict)


class _Reader:
    """Builds a study's model input (one catalog connection per thread)."""

    def __init__(self, builder_args: Any, net: Any, work_dir: Path) -> None:
        self.builder_args = builder_args
        self.work_dir = work_dir
        self.local = threading.local()
        if not hasattr(net, "eval_transforms"):  # a detector: its own preprocessing (medpipe.inference.detection)
            self.load, self.preprocess = dict, net.preprocess
            return
        spec = net.eval_transforms
        split = 0
        while split < len(spec) and next(iter(spec[split])) in LOAD_TRANSFORMS:
            split += 1
        from medpipe.data.transforms import build_transforms, tolerate_missing_keys

        spec = tolerate_missing_keys(spec)
        self.load = build_transforms(spec[:split])
        self.preprocess = build_transforms(spec[split:])

    def builder(self) -> Any:
        b = getattr(self.local, "builder", None)
        if b is None:
            from medpipe.data.datalist_builder import DatalistBuilder

            ingest_dir, rules, reference = self.builder_args
            b = DatalistBuilder(ingest_dir, rules, reference, None, work_dir=self.work_dir, log=log)
            self.local.builder = b
        return b

    def __call__(self, job: StudyJob) -> _Prepared:
        from medpipe.data.volumes import read_grid

        t0 = time.perf_counter()
        prep = _Prepared(job)
        try:
            built = self.builder().study(job.patient_id, job.study_uid, job.candidates)
            item = {k: v for k, v in built.item.items() if k not in ("label", "class")}
            prep.item = item
            data = self.load(dict(item))
            t1 = time.perf_counter()
            prep.times["read"] = t1 - t0
            prep.data = self.preprocess(data)
            prep.grid = read_grid(item["reference_volume"])
            prep.times["preprocess"] = time.perf_counter() - t1
        except StudySkipped as exc:
            prep.skipped = str(exc)
        except MemoryError:
            prep.failed = "out of memory while reading the study"
        except Exception as exc:  # one study's failure never stops the run
            log.debug("study %s failed while reading:\n%s", job.study_uid, traceback.format_exc())
            prep.failed = f"cannot be read: {_one_line(exc)}"
        prep.seconds = time.perf_counter() - t0
        return prep


class StudyScorer:
    """The per-study work of a scoring run, set up once per process (the model loaded once):
    :meth:`read` (+ preprocess), :meth:`infer`, :meth:`write`, or all three for one study: :meth:`score`.

    Every failure of a study becomes its ``failed`` row with a one-line reason (never an exception), so
    whoever runs the studies (this process's threads, or Dask workers: :mod:`medpipe.scoring.dask`) isolates
    failures the same way. Inference takes a lock: one study at a time per loaded model, while other threads
    read and write.
    """

    def __init__(self, package: ModelPackage, out: Path, options: ScoreOptions, builder_args: Any,
                 created: Any = None) -> None:
        from medpipe.inference.device import resolve_device
        from medpipe.scoring.results import ResultWriter

        self.package = package
        device, amp = resolve_device(options.device)
        t0 = time.perf_counter()
        self.net = package.load_model(device, amp)
        self.load_seconds = time.perf_counter() - t0
        self.writer = ResultWriter(package, self.net, out, options, created)
        self.reader = _Reader(builder_args, self.net, out / "inputs")
        self.tta = bool(package.inference.get("tta", False)) if options.tta is None else options.tta
        self._infer_lock = threading.Lock()

    def read(self, job: StudyJob) -> _Prepared:
        return self.reader(job)

    def infer(self, prep: _Prepared) -> tuple[Any, dict[str, Any] | None]:
        """``(prediction, None)``, or ``(None, the study's failed row)``."""
        t0 = time.perf_counter()
        try:
            with self._infer_lock:
                prediction = self.writer.infer(prep, self.tta)
        except MemoryError:
            return None, _row(prep, "failed", "out of memory during inference", seconds=prep.seconds)
        except Exception as exc:  # one study's failure never stops the run
            log.debug("study %s failed during inference:\n%s", prep.job.study_uid, traceback.format_exc())
            return None, _row(prep, "failed", f"inference failed: {_one_line(exc)}", seconds=prep.seconds)
        prep.times["infer"] = time.perf_counter() - t0
        prep.data = None  # the transformed input is not needed any more
        return prediction, None

    def write(self, prep: _Prepared, prediction: Any) -> dict[str, Any]:
        """The study's row (``ok``, or ``failed`` when writing failed); ``seconds`` covers the whole study."""
        t0 = time.perf_counter()
        try:
            row = self.writer.write(prep, prediction)
        except MemoryError:
            row = _row(prep, "failed", "out of memory while writing the results")
        except Exception as exc:  # one study's failure never stops the run
            log.debug("study %s failed while writing:\n%s", prep.job.study_uid, traceback.format_exc())
            row = _row(prep, "failed", f"results cannot be written: {_one_line(exc)}")
        else:
            prep.times["write"] = time.perf_counter() - t0
            row["seconds"] = prep.times["write"]
        row["seconds"] = row.get("seconds", 0.0) + prep.seconds + prep.times.get("infer", 0.0)
        return row

    def score(self, job: StudyJob) -> tuple[dict[str, Any], dict[str, float]]:
        """Read, infer and write one study: ``(its row, its stage times)``."""
        prep = self.read(job)
        if prep.skipped is not None or prep.failed is not None:
            return _unread_row(prep), prep.times
        prediction, failed = self.infer(prep)
        if failed is not None:
            return failed, prep.times
        return self.write(prep, prediction), prep.times


def _unread_row(prep: _Prepared) -> dict[str, Any]:
    status_ = "skipped" if prep.skipped is not None else "failed"
    return _row(prep, status_, prep.skipped or prep.failed or "", seconds=prep.seconds)


def _run_threads(todo: list[StudyJob], scorer: StudyScorer, options: ScoreOptions,
                 finish: Callable[[StudyJob, dict[str, Any], dict[str, float]], None]) -> None:
    """This process: reader threads read ahead, this thread infers, writer threads write (see the module doc)."""
    readers = ThreadPoolExecutor(max(1, options.readers), thread_name_prefix="medpipe-read")
    writers = ThreadPoolExecutor(max(1, options.writers), thread_name_prefix="medpipe-write")
    reads: deque[Future[_Prepared]] = deque()
    writes: deque[tuple[_Prepared, Future[dict[str, Any]]]] = deque()
    queue: Iterator[StudyJob] = iter(todo)
    ahead = max(1, options.prefetch)

    def fill() -> None:
        while len(reads) < ahead:
            job = next(queue, None)
            if job is None:
                return
            reads.append(readers.submit(scorer.read, job))

    def drain(block: bool, at_most: int | None = None) -> None:
        n = 0
        while writes and (block or writes[0][1].done()) and (at_most is None or n < at_most):
            n += 1
            prep, fut = writes.popleft()
            finish(prep.job, fut.result(), prep.times)

    try:
        fill()
        while reads:
            prep = reads.popleft().result()
            fill()
            if prep.skipped is not None or prep.failed is not None:
                finish(prep.job, _unread_row(prep), prep.times)
                drain(block=False)
                continue
            prediction, failed = scorer.infer(prep)
            if failed is not None:
                finish(prep.job, failed, prep.times)
                continue
            if len(writes) > max(1, options.writers):  # bounded: memory stays flat
                drain(block=True, at_most=len(writes) - max(1, options.writers))
            writes.append((prep, writers.submit(scorer.write, prep, prediction)))
            drain(block=False)
        drain(block=True)
    finally:
        readers.shutdown(wait=True, cancel_futures=True)
        writers.shutdown(wait=True, cancel_futures=True)


def _row(prep: _Prepared, status: str, reason: str, seconds: float = 0.0) -> dict[str, Any]:
    series = ""
    if prep.item is not None:
        series = ";".join(f"{k}={v}" for k, v in (prep.item.get("series_uids") or {}).items())
    return {"patient_id": prep.job.patient_id, "study_uid": prep.job.study_uid, "status": status,
            "reason": reason, "series_used": series, "seconds": seconds}


def failed_row(job: StudyJob, reason: str) -> dict[str, Any]:
    """The row of a study that failed outside the per-study work (e.g. every worker scoring it died)."""
    return _row(_Prepared(job), "failed", reason)
