"""A real Orthanc (Debian packages ``orthanc`` + ``orthanc-dicomweb``) for the PACS tests and benchmark.

Orthanc 1.10 listens on every interface and has no bind-address option, so it is only ever started
inside a **private network namespace** whose one interface is loopback (:class:`PrivateNetwork`):
nothing outside this process tree can reach it, and the tests contact 127.0.0.1 only.

:class:`PrivateNetwork` moves the *calling thread* into a fresh network namespace with
``unshare(CLONE_NEWNET)`` (root / CAP_SYS_ADMIN needed), brings ``lo`` up, and on exit returns the
thread to its original namespace with ``setns``. Threads and processes started by that thread while
inside (Orthanc, pynetdicom's servers, ``python -m medpipe.cli listen``) inherit the namespace.

:class:`Orthanc` writes a temporary configuration (storage in a temp dir, DICOM and HTTP ports on
loopback, the calling AEs in ``DicomModalities``, the DICOMweb plugin), starts ``Orthanc`` and waits
until its REST API answers; :meth:`Orthanc.stop` sends SIGTERM (SIGKILL after 20 s).
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CLONE_NEWNET = 0x40000000
ORTHANC_CANDIDATES = ("/usr/sbin/Orthanc", "/usr/bin/Orthanc")
DICOMWEB_PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc")
LOOPBACK = "127.0.0.1"


def orthanc_binary() -> str | None:
    for c in ORTHANC_CANDIDATES:
        if os.access(c, os.X_OK):
            return c
    return shutil.which("Orthanc")


def dicomweb_plugin() -> str | None:
    """The DICOMweb plugin library that ``orthanc-dicomweb`` installs in Orthanc's plugin folder."""
    for d in DICOMWEB_PLUGIN_DIRS:
        folder = Path(d)
        if folder.is_dir():
            for p in sorted(folder.glob("libOrthancDicomWeb.so*")):
                return str(p)
    return None


def why_no_orthanc() -> str | None:
    """None when Orthanc and its DICOMweb plugin are installed and a private network can be made; else why not."""
    if orthanc_binary() is None:
        return "Orthanc is not installed (apt-get install orthanc orthanc-dicomweb; .ci/run does it)"
    if dicomweb_plugin() is None:
        return "the Orthanc DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)"
    problem = PrivateNetwork.unavailable()
    if problem:
        return f"cannot make a private network namespace for Orthanc: {problem}"
    return None


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def only_loopback() -> bool:
    """True when this thread's network namespace has no interface but ``lo``."""
    return [name for _, name in socket.if_nameindex()] == ["lo"]


class PrivateNetwork:
    """Context manager: this thread in a new network namespace with only loopback, up."""

    def __init__(self) -> None:
        self._original: int | None = None

    @staticmethod
    def unavailable() -> str | None:
        if not Path("/proc/thread-self/ns/net").exists():
            return "no /proc/thread-self/ns/net (not Linux?)"
        if os.geteuid() != 0:
            return "needs root (CAP_SYS_ADMIN) for unshare(CLONE_NEWNET); CI runs as root"
        return None

    def __enter__(self) -> PrivateNetwork:
        libc = _libc()
        self._original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        if libc.unshare(CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            os.close(self._original)
            self._original = None
            raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")
        _loopback_up()
        if not only_loopback():  # pragma: no cover - the kernel gives a new namespace only lo
            self.__exit__()
            raise OSError("the new network namespace has interfaces other than lo")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._original is None:
            return
        libc = _libc()
        rc = libc.setns(self._original, CLONE_NEWNET)
        err = ctypes.get_errno()
        os.close(self._original)
        self._original = None
        if rc != 0:
            raise OSError(err, f"setns back to the original network namespace: {os.strerror(err)}")


def _loopback_up() -> None:
    """``ip link set lo up`` with two ioctls (no dependency on iproute2)."""
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH14s", b"lo", 0, b"")
        flags = struct.unpack("16sH14s", fcntl.ioctl(s, siocgifflags, req))[1]
        fcntl.ioctl(s, siocsifflags, struct.pack("16sH14s", b"lo", flags | iff_up, b""))


def make_certificates(folder: Path) -> dict[str, Path]:
    """A test CA and two certificates it signed (``orthanc``, ``medpipe``; both for 127.0.0.1), with ``openssl``.

    Returns the paths: ``ca``, ``orthanc_crt``, ``orthanc_key``, ``orthanc_pem`` (certificate + key, for
    Orthanc's HTTPS), ``medpipe_crt``, ``medpipe_key``.
    """
    folder.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
            "-subj", "/CN=medpipe test CA")
    for name in ("orthanc", "medpipe"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}")
        (folder / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
                                            "keyUsage=digitalSignature,keyEncipherment\n"
                                            "extendedKeyUsage=serverAuth,clientAuth\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext")
    return {"ca": folder / "ca.crt", "orthanc_crt": folder / "orthanc.crt", "orthanc_key": folder / "orthanc.key",
            "medpipe_crt": folder / "medpipe.crt", "medpipe_key": folder / "medpipe.key"}


class TlsProxy:
    """HTTPS on loopback in front of Orthanc's HTTP port (as nginx would be in a hospital).

    Needed because the HTTPS of Debian's Orthanc 1.10 (civetweb built against OpenSSL 3) crashes on the
    first connection. Requests and answers are passed through whole.
    """

    HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}

    def __init__(self, target_port: int, cert: Path, key: Path) -> None:
        import http.server
        import ssl
        import threading

        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _forward(self) -> None:
                import http.client

                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                conn = http.client.HTTPConnection(LOOPBACK, proxy.target_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in proxy.HOP}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in proxy.HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_POST = do_PUT = do_DELETE = _forward

        self.target_port = target_port
        self.server = http.server.ThreadingHTTPServer((LOOPBACK, 0), Handler)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(cert), str(key))
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def free_port() -> int:
    """A free TCP port on loopback (in the current network namespace)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


@dataclass
class Orthanc:
    """One Orthanc server with a temporary configuration; ``modalities``: name -> (AE, port) on loopback."""

    folder: Path
    aet: str = "ORTHANC"
    modalities: dict[str, tuple[str, int]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)  # e.g. {"TCP_NODELAY": "1"} (DCMTK inside Orthanc reads it)
    http_auth: tuple[str, str] | None = None  # (user, password) when the config registers users
    dicom_port: int = 0
    http_port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        if not only_loopback():
            raise RuntimeError("refusing to start Orthanc outside a private loopback-only network namespace")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.dicom_port = self.dicom_port or free_port()
        self.http_port = self.http_port or free_port()

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "Name": "medpipe-test",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "storage"),
            "StorageCompression": False,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpServerEnabled": True,
            "DicomServerEnabled": True,
            "DicomCheckCalledAet": True,
            "DicomModalities": {name: [aet, LOOPBACK, port] for name, (aet, port) in self.modalities.items()},
            "Plugins": [dicomweb_plugin()],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Host": LOOPBACK,
                         "Ssl": False},
            "SaveJobs": False,
            "ConcurrentJobs": 2,
            "HttpThreadsCount": 8,
            "DicomScpTimeout": 30,
            "DicomScuTimeout": 10,
            "StableAge": 1,
            "SyncStorageArea": False,
            "OverwriteInstances": False,
        }
        cfg.update(self.extra)
        return cfg

    def start(self, timeout: float = 30.0) -> Orthanc:
        binary = orthanc_binary()
        if binary is None:
            raise RuntimeError("Orthanc is not installed")
        cfg_path = self.folder / "orthanc.json"
        cfg_path.write_text(json.dumps(self.config(), indent=1))
        # setpriv --pdeathsig: Orthanc gets SIGKILL when the thread that started it ends (a killed test run)
        guard = ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []
        with open(self.folder / "orthanc.log", "ab") as log:
            self.proc = subprocess.Popen([*guard, binary, "--logdir=" + str(self.folder), str(cfg_path)], stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env={**os.environ, **self.env})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with status {self.proc.returncode}; see {self.folder}")
            try:
                self.rest("GET", "/system")
                if self._dicom_listening():
                    return self
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {timeout} s; see {self.folder}")

    def _dicom_listening(self) -> bool:
        try:
            with socket.create_connection((LOOPBACK, self.dicom_port), timeout=1):
                return True
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- REST ----------------------------------------------------------------------------------------

    def rest(self, method: str, path: str, body: bytes | dict[str, Any] | list[Any] | None = None,
             content_type: str = "application/json", timeout: float = 30.0) -> Any:
        data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", content_type)
        if self.http_auth is not None:
            import base64

            token = base64.b64encode(":".join(self.http_auth).encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # a loopback URL built here
            raw = resp.read()
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return raw

    def upload(self, paths: list[Path]) -> list[str]:
        """POST each file to /instances; returns Orthanc's instance ids."""
        ids = []
        for p in paths:
            got = self.rest("POST", "/instances", Path(p).read_bytes(), "application/dicom")
            ids.append(got["ID"])
        return ids

    def instances(self) -> list[str]:
        return list(self.rest("GET", "/instances"))

    def sop_instance_uids(self) -> set[str]:
        got = self.rest("POST", "/tools/find", {"Level": "Instance", "Query": {}, "Expand": True})
        return {x["MainDicomTags"]["SOPInstanceUID"] for x in got}

    def instance_file(self, sop_uid: str) -> bytes:
        ids = self.rest("POST", "/tools/lookup", sop_uid.encode(), "text/plain")
        inst = next(x for x in ids if x["Type"] == "Instance")
        return bytes(self.rest("GET", f"/instances/{inst['ID']}/file"))

    def clear(self) -> None:
        for pid in self.rest("GET", "/patients"):
            self.rest("DELETE", f"/patients/{pid}")

    def set_modality(self, name: str, aet: str, port: int, host: str = LOOPBACK) -> None:
        """Add or change a DICOM modality at run time (REST; lost at restart unless in the config)."""
        self.rest("PUT", f"/modalities/{name}", {"AET": aet, "Host": host, "Port": port})
        self.modalities[name] = (aet, port)

    def delete_modality(self, name: str) -> None:
        self.rest("DELETE", f"/modalities/{name}")
        self.modalities.pop(name, None)
