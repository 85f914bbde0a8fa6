"""``medpipe listen`` end to end against a real Orthanc (loopback only, private network namespace).

Orthanc sends studies to the listener (C-STORE, as a PACS routing rule would); the listener scores
the CT study once idle, pushes SEG + SR back, and Orthanc holds them afterwards; the MR study is
skipped with the reason. Bad objects and dropped associations do not stop it; a restart resumes a
study that had arrived but was not scored; the CLI runs it as a process and stops on SIGTERM. With an
allow-list only the AE titles (and nodes, from their host) it names may store; others are rejected
with a logged reason.
"""

from __future__ import annotations

import io
import logging
import signal
import socket
import subprocess
import sys
import time
import urllib.error
from pathlib import Path
from typing import Any

import pydicom
import pytest

from medpipe.pacs.listener import Listener, ListenerSettings, StudyBook
from medpipe.pacs.nodes import PacsNode, nodes_from_dict
from medpipe.pacs.push import push
from medpipe.pacs.scp import AllowList, StorageSCP
from medpipe.pacs.store import InstanceStore
from medpipe.scoring.engine import ScoreOptions
from tests.orthanc_server import LOOPBACK, Orthanc, free_port
from tests.pacs_support import Sample, node_settings, write_nodes
from tests.scoring_helpers import tiny_segmenter_package

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_segmenter_package(tmp_path_factory.mktemp("model") / "model", bias=1.0).path


def _orthanc_node(o: Orthanc) -> PacsNode:
    return nodes_from_dict({"nodes": {"orthanc": node_settings(o)}}).get("orthanc")


def _listener_node(port: int, calling: str = "MODALITY") -> PacsNode:
    return nodes_from_dict({"nodes": {"router": {"ae_title": "LISTENER", "host": LOOPBACK, "port": port,
                                                 "our_ae_title": calling, "timeout": 10,
                                                 "retries": 0}}}).get("router")


def _send_from_orthanc(o: Orthanc, study_uid: str, port: int) -> int:
    """Orthanc C-STOREs a whole study to the listener (REST: /modalities/listener/store); how many instances."""
    o.set_modality("listener", "LISTENER", port)
    ids = o.rest("POST", "/tools/lookup", study_uid.encode(), "text/plain")
    study = next(x["ID"] for x in ids if x["Type"] == "Study")
    o.rest("POST", "/modalities/listener/store", {"Resources": [study], "Synchronous": True}, timeout=60)
    return len(o.rest("GET", f"/studies/{study}/instances"))


def _results_in_orthanc(o: Orthanc, study_uid: str) -> dict[str, list[str]]:
    got = o.rest("POST", "/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid},
                                        "Expand": True})
    out: dict[str, list[str]] = {}
    for x in got:
        data = bytes(o.rest("GET", f"/instances/{x['ID']}/file"))
        cls = str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPClassUID)
        out.setdefault(cls, []).append(x["MainDicomTags"]["SOPInstanceUID"])
    return out


def _wait(book_path: Path, study: str, states: tuple[str, ...], timeout: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        book = StudyBook(book_path)
        try:
            rec = book.get(study)
        finally:
            book.close()
        if rec is not None and rec["state"] in states:
            return rec
        time.sleep(0.2)
    raise AssertionError(f"study {study} not in {states} after {timeout} s: {rec}")


def test_listener_end_to_end(orthanc: Orthanc, pacs_sample: Sample, model: Path, tmp_path: Path) -> None:
    port = free_port()
    settings = ListenerSettings(model=model, out=tmp_path / "router", port=port, ae_title="LISTENER", bind=LOOPBACK,
                                idle=1.0, push=_orthanc_node(orthanc), poll=0.1,
                                options=ScoreOptions(device="cpu", cpu_threads=1))
    listener = Listener(settings).start()
    try:
        # a dropped connection, an aborted association and a bad object first: the listener shrugs them off
        with socket.create_connection((LOOPBACK, port)) as s:
            s.sendall(b"\x01\x00garbage that is no A-ASSOCIATE-RQ")
        from pynetdicom import AE

        ae = AE("MODALITY")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2")
        assoc = ae.associate(LOOPBACK, port, ae_title="LISTENER")
        assert assoc.is_established
        assoc.abort()
        bad = tmp_path / "bad.dcm"
        ds = pydicom.dcmread(pacs_sample.ct_files[0])
        del ds.StudyInstanceUID  # no study to file it under
        ds.save_as(bad)
        refused = push(_listener_node(port), [bad])
        assert refused.results[0].status == "failed" and "0xC000" in refused.results[0].detail
        assert listener.scp is not None and listener.scp.handler.refused == 1

        _send_from_orthanc(orthanc, pacs_sample.ct_study, port)
        _send_from_orthanc(orthanc, pacs_sample.mr_study, port)
        book = tmp_path / "router" / "listener.sqlite"
        done = _wait(book, pacs_sample.ct_study, ("done", "failed"))
        assert done["state"] == "done", done
        assert done["instances"] == len(pacs_sample.ct_files)
        skipped = _wait(book, pacs_sample.mr_study, ("skipped", "failed"))
        assert skipped["state"] == "skipped" and "CT" in skipped["reason"], skipped
    finally:
        listener.stop()
    found = _results_in_orthanc(orthanc, pacs_sample.ct_study)
    written = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
               for p in (tmp_path / "router" / "results").rglob("*.dcm")}
    assert len(found.get(SEG, [])) == 1 and len(found.get(COMPREHENSIVE_3D_SR, [])) == 1, found
    assert set(found[SEG] + found[COMPREHENSIVE_3D_SR]) == set(written)
    seg = pydicom.dcmread(written[found[SEG][0]])
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == pacs_sample.ct_series
    mr_in_orthanc = {u for uids in _results_in_orthanc(orthanc, pacs_sample.mr_study).values() for u in uids}
    assert mr_in_orthanc == {u for u, f in pacs_sample.by_sop().items() if f not in pacs_sample.ct_files}  # nothing added


def test_listener_restart_resumes_pending_study(orthanc: Orthanc, pacs_sample: Sample, model: Path, tmp_path: Path) -> None:
    port = free_port()
    out = tmp_path / "router"
    common = {"model": model, "out": out, "port": port, "ae_title": "LISTENER", "bind": LOOPBACK,
              "push": _orthanc_node(orthanc), "poll": 0.1, "options": ScoreOptions(device="cpu", cpu_threads=1)}
    first = Listener(ListenerSettings(idle=3600.0, **common)).start()  # type: ignore[arg-type]
    try:
        sent = _send_from_orthanc(orthanc, pacs_sample.ct_study, port)
    finally:
        first.stop()
    rec = _wait(out / "listener.sqlite", pacs_sample.ct_study, ("receiving",), timeout=5)
    assert rec["instances"] == sent and not (out / "results").exists()
    # a study caught mid-scoring by a crash is scored again too
    book = StudyBook(out / "listener.sqlite")
    book.move(pacs_sample.ct_study, "scoring")
    book.close()

    second = Listener(ListenerSettings(idle=1.0, **common)).start()  # type: ignore[arg-type]
    try:
        done = _wait(out / "listener.sqlite", pacs_sample.ct_study, ("done", "failed"))
        assert done["state"] == "done", done
    finally:
        second.stop()
    assert len(list((out / "results").rglob("seg.dcm"))) == 1


def test_listen_cli_process(orthanc: Orthanc, pacs_sample: Sample, model: Path, tmp_path: Path) -> None:
    port = free_port()
    nodes = write_nodes(tmp_path / "pacs.yaml", {"orthanc": node_settings(orthanc)})
    out = tmp_path / "router"
    proc = subprocess.Popen([sys.executable, "-m", "medpipe.cli", "listen", "--port", str(port), "--model", str(model),
                             "--out", str(out), "--push", "orthanc", "--pacs", str(nodes), "--idle", "1", "--bind",
                             LOOPBACK, "--ae-title", "LISTENER", "--device", "cpu", "--cpu-threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                socket.create_connection((LOOPBACK, port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[0]
        _send_from_orthanc(orthanc, pacs_sample.ct_study, port)
        done = _wait(out / "listener.sqlite", pacs_sample.ct_study, ("done", "failed"))
        assert done["state"] == "done", done
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            output, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
    assert proc.returncode == 0, output
    assert "listening as LISTENER" in output and "pushed 2 file(s) to orthanc" in output and "listener stopped" in output


def test_listener_allow_list(orthanc: Orthanc, pacs_sample: Sample, model: Path, tmp_path: Path,
                             caplog: pytest.LogCaptureFixture) -> None:
    """Only --allow AE titles and --allow-node nodes (from their host) may store; the rest is rejected and logged."""
    caplog.set_level(logging.WARNING, logger="medpipe.pacs")
    port = free_port()
    out = tmp_path / "router"
    allow = AllowList.build(["MODALITY"], [_orthanc_node(orthanc)])
    listener = Listener(ListenerSettings(model=model, out=out, port=port, ae_title="LISTENER", bind=LOOPBACK,
                                         idle=3600.0, poll=0.1, allow=allow,
                                         options=ScoreOptions(device="cpu", cpu_threads=1))).start()
    try:
        stranger = push(_listener_node(port, "STRANGER"), pacs_sample.ct_files[:1])
        assert stranger.results[0].status == "failed"
        assert "does not know our calling AE title STRANGER" in stranger.results[0].detail
        allowed = push(_listener_node(port), pacs_sample.ct_files[:1])
        assert allowed.results[0].status == "ok", allowed.results[0].detail
        sent = _send_from_orthanc(orthanc, pacs_sample.ct_study, port)  # Orthanc: allowed as its node, from 127.0.0.1
        rec = _wait(out / "listener.sqlite", pacs_sample.ct_study, ("receiving",), timeout=5)
        assert rec["instances"] == sent
        assert listener.scp is not None and listener.scp.gate is not None
        assert len(listener.scp.gate.rejected) == 1
    finally:
        listener.stop()
    stored = {p.stem for p in (out / "incoming").rglob("*.dcm")}
    assert len(stored) == sent  # the study as Orthanc holds it (the pushed CT instance is one of them)
    assert {u for u, f in pacs_sample.by_sop().items() if f in pacs_sample.ct_files} <= stored
    lines = [r.getMessage() for r in caplog.records if "rejected an association" in r.getMessage()]
    assert len(lines) == 1 and "'STRANGER' is not allowed" in lines[0] and "--allow STRANGER" in lines[0], lines
    assert "\n" not in lines[0]


def test_allow_node_pins_its_address(orthanc: Orthanc, pacs_sample: Sample, tmp_path: Path,
                                     caplog: pytest.LogCaptureFixture) -> None:
    """Orthanc's AE title from an address that is not its node's host: rejected, and the log says which address."""
    caplog.set_level(logging.WARNING, logger="medpipe.pacs")
    elsewhere = nodes_from_dict({"nodes": {"orthanc": {**{k: v for k, v in _orthanc_node(orthanc).model_dump().items()
                                                            if k in ("ae_title", "port")},
                                                         "host": "127.0.0.2"}}}).get("orthanc")
    port = free_port()
    scp = StorageSCP(InstanceStore(tmp_path / "in"), "LISTENER", port, LOOPBACK, allow=AllowList.build([], [elsewhere]))
    with scp, pytest.raises(urllib.error.HTTPError):  # Orthanc's REST call fails: its association was rejected
        _send_from_orthanc(orthanc, pacs_sample.ct_study, port)
    assert scp.received == 0 and not list((tmp_path / "in").rglob("*.dcm"))
    lines = [r.getMessage() for r in caplog.records if "rejected an association" in r.getMessage()]
    assert lines and f"{orthanc.aet!r} is allowed from node orthanc at 127.0.0.2" in lines[0], lines
    assert "came from 127.0.0.1" in lines[0]


def test_allow_list_needs_a_dimse_node(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from medpipe.cli import app
    from medpipe.errors import ConfigError

    nodes = write_nodes(tmp_path / "pacs.yaml", {"web": {"dicomweb": "http://127.0.0.1:1/dicom-web"}})
    result = CliRunner().invoke(app, ["listen", "--port", "11112", "--model", str(tmp_path / "model"), "--out",
                                      str(tmp_path / "out"), "--pacs", str(nodes), "--allow-node", "web"])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1, result.output
    assert "--allow-node web: the node has no DIMSE ae_title and host" in errors[0]

    web_only = nodes_from_dict({"nodes": {"web": {"dicomweb": "http://127.0.0.1:1/dicom-web"}}}).get("web")
    with pytest.raises(ConfigError, match="--allow-node web: the node has no DIMSE"):
        AllowList.build([], [web_only])
    with pytest.raises(ConfigError, match=r"--allow .*no backslash"):
        AllowList.build(["A\\B"])
    assert not AllowList.build()
    anywhere = AllowList.build(["PACS"], [nodes_from_dict({"nodes": {"p": {"ae_title": "PACS", "host": "127.0.0.1",
                                                                           "port": 104}}}).get("p")])
    assert anywhere.refusal("PACS", "10.1.2.3") is None  # --allow wins over the node's host
    assert anywhere.refusal("PACS ", "::ffff:10.1.2.3") is None
