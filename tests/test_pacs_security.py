"""TLS and HTTP authentication from the node file, against a real Orthanc (loopback only, private namespace).

Orthanc runs with DICOM TLS (client certificates required, also on the associations it opens to our
C-MOVE storage SCP) and a registered user, its HTTP behind an HTTPS proxy on loopback (Debian's
Orthanc 1.10 crashes when its own HTTPS is used); certificates come from a throw-away CA made with
``openssl``. medpipe echoes, pulls by C-MOVE and WADO-RS, and pushes by STOW-RS through them; a wrong
password and a missing client certificate fail with their one-line fixes.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from medpipe.cli import app
from medpipe.errors import PacsError
from medpipe.pacs.nodes import nodes_from_dict
from medpipe.pacs.pull import pull
from medpipe.pacs.push import push
from medpipe.pacs.query import StudyQuery
from tests.orthanc_server import LOOPBACK, Orthanc, TlsProxy, free_port, make_certificates
from tests.pacs_support import Sample, dataset_bytes, write_nodes

USER, PASSWORD = "ai-router", "s3cret-for-tests"


@pytest.fixture(scope="module")
def secure(private_network: object, tmp_path_factory: pytest.TempPathFactory, pacs_sample: Sample
           ) -> Iterator[tuple[Orthanc, dict[str, Path], int, str]]:
    if shutil.which("openssl") is None:
        if os.environ.get("MEDPIPE_REQUIRE_ORTHANC") == "1":
            pytest.fail("openssl is needed to make the test certificates (apt-get install openssl)")
        pytest.skip("openssl is not installed (needed to make the test certificates)")
    folder = tmp_path_factory.mktemp("secure-orthanc")
    certs = make_certificates(folder / "certs")
    port = free_port()
    o = Orthanc(folder / "orthanc", http_auth=(USER, PASSWORD), extra={
        "DicomTlsEnabled": True, "DicomTlsCertificate": str(certs["orthanc_crt"]),
        "DicomTlsPrivateKey": str(certs["orthanc_key"]), "DicomTlsTrustedCertificates": str(certs["ca"]),
        "DicomTlsRemoteCertificateRequired": True,
        "DicomModalities": {"medpipe": {"AET": "MEDPIPE", "Host": LOOPBACK, "Port": port, "UseDicomTls": True}},
        "AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD},
    })
    o.start()
    proxy = TlsProxy(o.http_port, certs["orthanc_crt"], certs["orthanc_key"])
    try:
        o.upload(pacs_sample.ct_files)
        yield o, certs, port, f"https://{LOOPBACK}:{proxy.port}/dicom-web"
    finally:
        proxy.stop()
        o.stop()


def _settings(secure: tuple[Orthanc, dict[str, Path], int, str], **overrides: Any) -> dict[str, Any]:
    o, certs, port, https = secure
    s: dict[str, Any] = {
        "ae_title": o.aet, "host": LOOPBACK, "port": o.dicom_port, "our_port": port, "bind": LOOPBACK,
        "dicomweb": https, "timeout": 10, "retries": 0,
        "auth": {"username": USER, "password_env": "TEST_ORTHANC_PASSWORD"},
        "tls": {"ca_file": str(certs["ca"]), "cert_file": str(certs["medpipe_crt"]),
                "key_file": str(certs["medpipe_key"]), "dimse": True},
    }
    s.update(overrides)
    return s


def _node(settings: dict[str, Any]):  # type: ignore[no-untyped-def]
    return nodes_from_dict({"nodes": {"secure": settings}}).get("secure")


def test_tls_and_auth_echo_pull_push(secure: tuple[Orthanc, dict[str, Path], int, str], pacs_sample: Sample,
                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    o = secure[0]
    monkeypatch.setenv("TEST_ORTHANC_PASSWORD", PASSWORD)
    settings = _settings(secure)
    assert settings["dicomweb"].startswith("https://")
    nodes = write_nodes(tmp_path / "pacs.yaml", {"secure": settings})
    result = CliRunner().invoke(app, ["pacs", "echo", "secure", "--pacs", str(nodes)])
    assert result.exit_code == 0 and result.output.count(": ok") == 2, result.output

    node = _node(settings)
    query = StudyQuery(study_uids=(pacs_sample.ct_study,))
    originals = {f.stem: f for f in pacs_sample.ct_files}
    by_sop = pacs_sample.by_sop()
    for method in ("move", "wado"):  # C-MOVE: Orthanc opens a TLS association to our SCP, with its certificate
        report = pull(node, query, tmp_path / method, methods=(method,))
        assert report.received == len(originals)
        for p in (tmp_path / method).rglob("*.dcm"):
            assert dataset_bytes(p.read_bytes()) == dataset_bytes(by_sop[p.stem].read_bytes())

    o.clear()
    stored = push(node, pacs_sample.ct_files, via="dicomweb")
    assert {r.status for r in stored.results} == {"ok"}
    assert len(o.instances()) == len(pacs_sample.ct_files)
    stored = push(node, pacs_sample.ct_files[:2], via="dimse")  # C-STORE over TLS too (already there: fine)
    assert {r.status for r in stored.results} == {"ok"}


def test_wrong_password_and_missing_client_certificate(secure: tuple[Orthanc, dict[str, Path], int, str],
                                                       tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    certs = secure[1]
    monkeypatch.setenv("TEST_ORTHANC_PASSWORD", "wrong")
    settings = _settings(secure)
    nodes = write_nodes(tmp_path / "pacs.yaml", {"secure": settings})
    result = CliRunner().invoke(app, ["pacs", "echo", "secure", "--via", "dicomweb", "--pacs", str(nodes)])
    assert result.exit_code == 2
    assert "answered HTTP 401 (unauthorised): check auth: (username / password_env / token_env)" in result.output

    no_cert = _settings(secure, tls={"ca_file": str(certs["ca"]), "dimse": True})
    with pytest.raises(PacsError) as err:
        from medpipe.pacs.dimse import echo

        echo(_node(no_cert))
    assert "C-ECHO to secure" in str(err.value) and "requires our client certificate: add cert_file" in str(err.value)

    untrusted = _settings(secure, tls={"cert_file": str(certs["medpipe_crt"]), "key_file": str(certs["medpipe_key"]),
                                       "dimse": True})
    with pytest.raises(PacsError, match="TLS handshake with secure .* failed"):
        from medpipe.pacs.dimse import echo

        echo(_node(untrusted))  # Orthanc's certificate is not signed by a CA we trust
