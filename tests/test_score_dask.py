"""``medpipe score --dask``: one task per study on Dask workers, the driver alone writing the tables.

Clusters here are real: a ``LocalCluster`` of 2 worker processes on 127.0.0.1, without dashboard. The
reference is the single-process path on the same export with the same content time: the Dask path must
write the same files byte for byte, isolate a failing study the same way, resume the same way, and survive
a worker killed mid-run.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import signal
import sqlite3
import sys
from pathlib import Path
from typing import Any

import pytest

from medpipe.errors import ConfigError
from medpipe.inference.package import ModelPackage
from medpipe.scoring.engine import ScoreOptions, ScoreReport, score
from tests.dicom_factory import Geometry
from tests.scoring_helpers import tiny_segmenter_package
from tests.test_score import _export, _series

distributed = pytest.importorskip("distributed")

CREATED = dt.datetime(2024, 5, 6, 7, 8, 9)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted((root / "results").rglob("*")) if p.is_file()}


def _csv(out: Path) -> list[dict[str, str]]:
    with open(out / "scores.csv", newline="") as fh:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(fh)]


def _status(out: Path) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(out / "score_status.sqlite")
    rows = db.execute("SELECT study_uid, model_id, fingerprint, status, row FROM scores ORDER BY study_uid").fetchall()
    db.close()
    out_rows = []
    for uid, model, fp, status, row in rows:
        doc = json.loads(row)
        doc.pop("seconds")
        out_rows.append((uid, model, fp, status, doc))
    return out_rows


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An ingested export of 5 CT studies (one of them damaged after ingest) and 1 MR study (no CT: skipped), a
    tiny model, and the single-process reference scoring."""
    from medpipe.ingest import ingest

    root = tmp_path_factory.mktemp("cohort")
    src = _export(root / "src", 5)
    _series(src, Geometry(), patient="MR1", tag="mr", modality="MR", seed=9)
    ingest(src, root / "ingested", workers=1)
    damaged = min((root / "ingested" / "volumes" / "P3").glob("*.nii.gz"))
    damaged.write_bytes(b"not a nifti file")
    package = tiny_segmenter_package(root / "model")
    reference = score(root / "ingested", package, root / "reference", ScoreOptions(cpu_threads=1, created=CREATED))
    assert reference.counts == {"ok": 4, "failed": 1, "skipped": 1}
    return {"root": root, "ingested": root / "ingested", "package": package, "reference": reference}


@pytest.fixture(scope="module")
def on_dask(cohort: dict[str, Any]) -> ScoreReport:
    return score(cohort["ingested"], cohort["package"], cohort["root"] / "dask",
                 ScoreOptions(cpu_threads=1, created=CREATED, dask="local:2"))


@pytest.mark.slow
def test_dask_outputs_equal_the_single_process_outputs_byte_for_byte(cohort: dict[str, Any],
                                                                     on_dask: ScoreReport) -> None:
    ref, got = cohort["root"] / "reference", cohort["root"] / "dask"
    assert on_dask.n_scored == 6 and "start_cluster" in on_dask.seconds
    expected = _files(ref)
    assert len(expected) == 4 * 3, "seg.dcm, sr.dcm and preview.png per scored study"
    assert _files(got) == expected
    assert _csv(got) == _csv(ref), "scores.csv: the same rows in the same order (times aside)"
    assert _status(got) == _status(ref), "the status table: the same rows"


@pytest.mark.slow
def test_one_failing_study_does_not_stop_the_others_on_dask(cohort: dict[str, Any], on_dask: ScoreReport) -> None:
    by_patient = {r["patient_id"]: r for r in on_dask.rows}
    assert by_patient["P3"]["status"] == "failed" and by_patient["P3"]["reason"].startswith("cannot be read: ")
    assert by_patient["MR1"]["status"] == "skipped"
    assert [by_patient[p]["status"] for p in ("P0", "P1", "P2", "P4")] == ["ok"] * 4
    ref = {r["patient_id"]: r["reason"] for r in cohort["reference"].rows}
    assert {p: r["reason"] for p, r in by_patient.items()} == ref, "the same one-line reasons as in one process"


@pytest.mark.slow
def test_a_dask_run_resumes_like_a_local_one(cohort: dict[str, Any], on_dask: ScoreReport) -> None:
    out = cohort["root"] / "dask"
    before = {p: p.stat().st_mtime_ns for p in (out / "results").rglob("seg.dcm")}
    again = score(cohort["ingested"], cohort["package"], out,
                  ScoreOptions(cpu_threads=1, created=CREATED, dask="local:2"))
    assert again.n_reused == 5 and again.n_scored == 1, "only the failed study is tried again"
    assert "start_cluster" in again.seconds
    assert {p: p.stat().st_mtime_ns for p in (out / "results").rglob("seg.dcm")} == before, "nothing rewritten"


@pytest.mark.slow
def test_a_worker_killed_mid_run_is_survived(tmp_path: Path, cohort: dict[str, Any]) -> None:
    """A cluster of our own (tcp://): after the first study is recorded, one worker process is killed with
    SIGKILL while both have studies in hand; its studies go to the other worker (or to its replacement, which
    loads the model again), and every study ends as in the single-process run."""
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                           dashboard_address=None, scheduler_kwargs={"dashboard": False,
                                                                     "dashboard_address": "127.0.0.1:0"})
    client = Client(cluster)
    try:
        pids = client.run(os.getpid)
        assert len(pids) == 2
        killed: list[int] = []

        def kill_one(row: dict[str, Any]) -> None:
            if not killed:
                pid = min(pids.values())
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

        report = score(cohort["ingested"], cohort["package"], tmp_path / "out",
                       ScoreOptions(cpu_threads=1, created=CREATED, dask=cluster.scheduler_address),
                       on_study=kill_one)
        assert killed
        alive = client.run(os.getpid)
        assert killed[0] not in alive.values(), "the worker was really killed"
        assert client.run_on_scheduler(_rescheduled), "the killed worker had a study in hand, given to another"
    finally:
        client.close()
        cluster.close()
    assert report.counts == cohort["reference"].counts, report.rows
    assert _files(tmp_path / "out") == _files(cohort["root"] / "reference")
    assert _csv(tmp_path / "out") == _csv(cohort["root"] / "reference")


def _rescheduled(dask_scheduler: Any) -> list[str]:
    """The study tasks that were being computed by a worker and went back to be computed again."""
    return sorted({str(t[0]) for t in dask_scheduler.transition_log
                   if str(t[0]).startswith("medpipe-study-") and t[1] == "processing" and t[2] != "memory"})


def test_dask_specs_are_checked_with_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from medpipe.cli import app
    from medpipe.scoring import dask as dask_scoring

    assert dask_scoring.parse_spec("local:2") == ("local", 2)
    assert dask_scoring.parse_spec("tcp://10.0.0.5:8786") == ("tcp", "tcp://10.0.0.5:8786")
    for bad in ("local:0", "local:x", "8786", "tcp://host", "ray://x:1"):
        with pytest.raises(ConfigError, match="expected local:N"):
            dask_scoring.parse_spec(bad)
    result = CliRunner().invoke(app, ["score", str(tmp_path), "--model", str(tmp_path), "--out",
                                      str(tmp_path / "out"), "--dask", "locl:2"])
    assert result.exit_code == 2 and result.output.count("error: ") == 1
    assert "--dask locl:2: expected local:N" in result.output
    assert not (tmp_path / "out").exists(), "refused before anything was ingested or written"
    monkeypatch.setitem(sys.modules, "distributed", None)  # as if the optional extra were not installed
    with pytest.raises(ConfigError, match="optional dependency") as info:
        dask_scoring._distributed()
    assert info.value.hint == "pip install 'medpipe[dask]'"


@pytest.mark.slow
def test_an_unreachable_scheduler_is_one_line(monkeypatch: pytest.MonkeyPatch, cohort: dict[str, Any],
                                              tmp_path: Path) -> None:
    import socket

    from medpipe.scoring import dask as dask_scoring

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(dask_scoring, "CONNECT_TIMEOUT", 2)
    package: ModelPackage = cohort["package"]
    with pytest.raises(ConfigError, match=f"tcp://127.0.0.1:{port}: cannot reach the Dask scheduler") as info:
        score(cohort["ingested"], package, tmp_path / "out", ScoreOptions(dask=f"tcp://127.0.0.1:{port}"))
    assert "\n" not in str(info.value)
