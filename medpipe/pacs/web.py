"""DICOMweb with dicomweb-client: QIDO-RS queries, WADO-RS retrieval of the stored bytes, STOW-RS.

Two traps this module takes care of:

* **media types**: WADO-RS without a transfer syntax parameter means Explicit VR Little Endian, so a
  server transcodes (decompresses) every compressed instance. medpipe asks for
  ``multipart/related; type="application/dicom"; transfer-syntax=*`` and writes each part's bytes
  unchanged: the file as the PACS stores it.
* **the root URL**: the node's ``dicomweb`` is the service root (Orthanc:
  ``http://host:8042/dicom-web``, not ``http://host:8042``); medpipe builds every URL from it and never
  follows the ``RetrieveURL`` a server puts in its answers (Orthanc writes its configured ``Host``
  there, often ``localhost`` and without the port). A 404 on the root says so.

dicomweb-client does the HTTP (a ``requests`` session with our auth / TLS, its retries on 429 / 503 /
504) and the multipart coding; for WADO-RS and STOW-RS its bytes-level methods are used
(``_http_get`` + ``_decode_multipart_message``, ``_http_post_multipart_application_dicom``), because its
public ones decode every instance into a pydicom Dataset and encode it again, which need not give
the same bytes.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

from medpipe.errors import PacsError
from medpipe.pacs.dimse import Found
from medpipe.pacs.nodes import PacsNode

log = logging.getLogger("medpipe.pacs")

ACCEPT_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'
STUDY_FIELDS = ("PatientID", "PatientName", "StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy",
                "StudyDescription", "StudyInstanceUID", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
                "SOPClassesInStudy")
SERIES_FIELDS = ("StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription",
                 "NumberOfSeriesRelatedInstances")
INSTANCE_FIELDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "InstanceNumber")
#: QIDO-RS page size; pages are asked for until one is short or brings nothing new
PAGE = 1000


def client(node: PacsNode) -> Any:
    """A DICOMweb client for the node's root URL, with its auth, TLS, timeout and retries."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    url = node.dicomweb_url()

    class Session(requests.Session):
        """The node's TLS settings win over REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE, which requests otherwise lets
        override a session's own ``verify`` (psf/requests#3829)."""

        pinned: Any = None

        def merge_environment_settings(self, *args: Any, **kwargs: Any) -> Any:
            out = super().merge_environment_settings(*args, **kwargs)
            if self.pinned is not None:
                out["verify"] = self.pinned
            return out

    session = Session()
    if node.auth is not None:
        if node.auth.username is not None:
            session.auth = (node.auth.username, node.auth.resolve_password() or "")
        else:
            session.headers["Authorization"] = f"Bearer {node.auth.resolve_token()}"
    if node.tls is not None:
        session.verify = session.pinned = (str(node.tls.ca_file) if node.tls.ca_file and node.tls.verify
                                           else node.tls.verify)
        if node.tls.cert_file is not None:
            session.cert = (str(node.tls.cert_file), str(node.tls.key_file)) if node.tls.key_file \
                else str(node.tls.cert_file)
    c = DICOMwebClient(url, session=session, timeout=node.timeout)
    # dicomweb-client retries 429 / 408 / 503 / 504 itself, with exponential back-off (multiplier in ms)
    c.set_http_retry_params(retry=node.retries > 0, max_attempts=node.retries + 1,
                            wait_exponential_multiplier=max(1, int(node.retry_delay * 1000)))
    return c


def http_failure(node: PacsNode, exc: BaseException, what: str) -> PacsError:
    """One line for a failed DICOMweb request: refused, timeout, TLS, auth, wrong root URL, media type."""
    import requests

    url = node.dicomweb or "?"
    if isinstance(exc, requests.exceptions.SSLError):
        import re

        why = re.findall(r"\[SSL[^\]]*\][^'\")]*", str(exc))
        return PacsError(f"{what}: TLS with {url} failed{' (' + why[-1].strip() + ')' if why else ''}: check tls: "
                         "(ca_file, cert_file, key_file) in the node file against the server's certificate")
    if isinstance(exc, requests.exceptions.ConnectTimeout | requests.exceptions.ReadTimeout):
        return PacsError(f"{what}: {url} did not answer within {node.timeout:g} s: raise timeout in the node file "
                         "or try again", transient=True)
    if isinstance(exc, requests.exceptions.ConnectionError):
        text = str(exc)
        if "Connection refused" in text or "ECONNREFUSED" in text or "Errno 111" in text:
            return PacsError(f"{what}: connection refused by {url}: check the dicomweb URL (host and port) in the node "
                             "file and that the server runs", transient=True)
        if "Name or service not known" in text or "getaddrinfo" in text or "nodename nor servname" in text:
            return PacsError(f"{what}: unknown host in {url}: fix dicomweb in the node file")
        return PacsError(f"{what}: connection to {url} failed or was lost; run again (what arrived is kept)",
                         transient=True)
    if isinstance(exc, requests.exceptions.HTTPError) and exc.response is not None:
        code = exc.response.status_code
        if code in (401, 403):
            return PacsError(f"{what}: {url} answered HTTP {code} ({'unauthorised' if code == 401 else 'forbidden'}): "
                             "check auth: (username / password_env / token_env) in the node file")
        if code in (400, 404):
            return PacsError(f"{what}: {url} answered HTTP {code} ({exc.response.reason}): is {url} the DICOMweb root? "
                             "Orthanc's is http://HOST:8042/dicom-web (with the DICOMweb plugin); fix dicomweb in the "
                             "node file")
        if code in (406, 415):
            return PacsError(f"{what}: {url} answered HTTP {code}: it does not serve the media type / transfer syntax "
                             "asked for (multipart/related; type=\"application/dicom\"; transfer-syntax=*)")
        if code in (408, 429, 500, 502, 503, 504):
            return PacsError(f"{what}: {url} answered HTTP {code} (busy or failing); try again later", transient=True)
        return PacsError(f"{what}: {url} answered HTTP {code}: {exc.response.reason}")
    return PacsError(f"{what}: {type(exc).__name__}: {exc}"[:300])


def _run(node: PacsNode, what: str, fn: Any) -> Any:
    import requests

    try:
        return fn()
    except (requests.exceptions.RequestException, OSError) as exc:
        raise http_failure(node, exc, what) from None
    except ValueError as exc:  # dicomweb-client: unexpected content type / malformed multipart
        raise PacsError(f"{what}: unexpected answer from {node.dicomweb}: {exc}"[:300]) from None


def echo(node: PacsNode) -> float:
    """One QIDO-RS request (``/studies?limit=1``); returns the round trip in milliseconds."""
    c = client(node)
    t0 = time.monotonic()
    _run(node, f"QIDO-RS at {node.name}", lambda: c.search_for_studies(limit=1, fields=["StudyInstanceUID"]))
    return (time.monotonic() - t0) * 1000.0


def _found(item: Any, keys: Sequence[str], node: PacsNode) -> Found:
    from pydicom.dataset import Dataset

    from medpipe.pacs.dimse import _text

    if not isinstance(item, dict):
        raise PacsError(f"QIDO-RS at {node.name}: the answer is not DICOM JSON: is {node.dicomweb} the DICOMweb root? "
                        "Orthanc's is http://HOST:8042/dicom-web; fix dicomweb in the node file")
    ds = Dataset.from_json(item)
    return Found({k: _text(ds, k) for k in keys})


class WebFinder:
    """QIDO-RS with the same three queries as :class:`medpipe.pacs.dimse.DimseFinder`."""

    def __init__(self, node: PacsNode) -> None:
        self.node = node
        self.client: Any = None

    def __enter__(self) -> WebFinder:
        self.client = client(self.node)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.client = None

    def _search(self, what: str, search: Any, keys: Sequence[str], unique: str) -> list[Found]:
        """All matches, page by page. dicomweb-client's ``get_remaining`` is not used: a server that ignores
        ``offset`` with some filters (Orthanc 1.10 with ``ModalitiesInStudy``) would make it loop forever."""
        out: dict[str, Found] = {}
        offset = 0
        while True:
            got = _run(self.node, what, lambda offset=offset: search(limit=PAGE, offset=offset))
            new = 0
            for item in got:
                f = _found(item, keys, self.node)
                if f[unique] not in out:
                    out[f[unique]] = f
                    new += 1
            if len(got) < PAGE or new == 0:
                return list(out.values())
            offset += len(got)

    def studies(self, query: Any) -> list[Found]:
        filters = {k: v for k, v in {"PatientID": query.patient_id, "StudyDate": query.study_date,
                                     "AccessionNumber": query.accession, "ModalitiesInStudy": query.modality,
                                     "StudyDescription": query.description}.items() if v}
        what = f"QIDO-RS (studies) at {self.node.name}"
        out: list[Found] = []
        for uid in list(query.study_uids) or [None]:  # one request per UID: not every server takes UID lists
            f = dict(filters, **({"StudyInstanceUID": uid} if uid else {}))
            out.extend(self._search(what, lambda f=f, **kw: self.client.search_for_studies(
                fields=list(STUDY_FIELDS), search_filters=f, **kw), STUDY_FIELDS, "StudyInstanceUID"))
        return out

    def series(self, study_uid: str, modality: str | None = None) -> list[Found]:
        what = f"QIDO-RS (series) at {self.node.name}"
        return self._search(what, lambda **kw: self.client.search_for_series(
            study_uid, fields=list(SERIES_FIELDS), search_filters={"Modality": modality} if modality else None, **kw),
            SERIES_FIELDS, "SeriesInstanceUID")

    def instances(self, study_uid: str, series_uid: str) -> list[Found]:
        what = f"QIDO-RS (instances) at {self.node.name}"
        return self._search(what, lambda **kw: self.client.search_for_instances(
            study_uid, series_uid, fields=list(INSTANCE_FIELDS), **kw), INSTANCE_FIELDS, "SOPInstanceUID")


class _ClosingWatch:
    """A streamed ``requests`` response whose body is watched for the closing multipart delimiter.

    dicomweb-client's multipart decoder hands out whatever follows the last delimiter when the body
    ends, so a response cut off in the middle of an instance (the server stopped, the connection lost)
    would give a truncated part as if it were complete. With this watch the caller can tell.
    """

    def __init__(self, resp: Any, boundary: bytes) -> None:
        self._resp = resp
        self.closing = b"\r\n--" + boundary + b"--"
        self.closed = False
        self._tail = b""

    @property
    def headers(self) -> Any:
        return self._resp.headers

    @property
    def content(self) -> bytes:
        data = bytes(self._resp.content)
        self.closed = self.closing in data
        return data

    def __enter__(self) -> Any:
        self._resp.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._resp.__exit__(*exc)

    def iter_content(self, chunk_size: int | None = None) -> Iterator[bytes]:
        n = len(self.closing)
        for chunk in self._resp.iter_content(chunk_size=chunk_size):
            if not self.closed and (self.closing in chunk or self.closing in self._tail + chunk[:n]):
                self.closed = True
            self._tail = bytes(chunk[-n:]) if len(chunk) >= n else (self._tail + chunk)[-n:]
            yield chunk


def _boundary(content_type: str) -> bytes | None:
    for item in content_type.split(";")[1:]:
        attr, _, value = item.strip().partition("=")
        if attr.lower() == "boundary":
            return value.strip().strip('"').encode("utf-8")
    return None


def iter_stored(node: PacsNode, c: Any, path: str) -> Iterator[bytes]:
    """WADO-RS: the instances under ``path`` (``studies/S/series/X`` or ``.../instances/I``) as stored bytes.

    Each part is handed out only once the next one began or the response's closing boundary arrived: a
    response that ends before it (a server stopped mid-transfer) is a transient error, and its last,
    possibly truncated part is dropped, never written.
    """
    url = f"{node.dicomweb_url()}/{path}"
    what = f"WADO-RS at {node.name}"
    watch: list[_ClosingWatch] = []

    def request() -> Any:
        resp = c._http_get(url, headers={"Accept": ACCEPT_STORED}, stream=True)
        kind = resp.headers.get("Content-Type", "")
        if kind.startswith("application/dicom"):  # non-conformant single part: accept it as one instance
            return iter([resp.content])
        boundary = _boundary(kind)
        if boundary is None:  # dicomweb-client then yields the body as it is
            return c._decode_multipart_message(resp, stream=True)
        watch.append(_ClosingWatch(resp, boundary))
        return c._decode_multipart_message(watch[0], stream=True)

    def cut() -> PacsError:
        return PacsError(f"{what}: the answer from {node.name} ended before its closing multipart boundary (the "
                         "server stopped or the connection was lost mid-transfer); run the same command again: what "
                         "arrived is kept", transient=True)

    parts = _run(node, what, request)
    held: bytes | None = None
    while True:
        try:
            part = _run(node, what, lambda: next(parts, None))
        except PacsError:
            if watch and not watch[0].closed:
                raise cut() from None
            raise
        if part is None:
            break
        if held is not None:
            yield held
        held = bytes(part)
    if held is not None:
        if watch and not watch[0].closed:
            raise cut()
        yield held


def part_uids(data: bytes) -> tuple[str, str, str]:
    """(Study, Series, SOP Instance UID) of a Part 10 byte string, reading only its header."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True,
                         specific_tags=["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
    return (str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", "")),
            str(ds.get("SOPInstanceUID", "")))


def stow(node: PacsNode, c: Any, parts: Sequence[bytes]) -> Any:
    """STOW-RS of whole Part 10 files; returns the server's response data set (Referenced / Failed SOP sequences).

    A 409 (some instances refused) still carries that data set: it is returned, not raised.
    """
    import requests
    from pydicom.dataset import Dataset

    url = f"{node.dicomweb_url()}/studies"
    what = f"STOW-RS to {node.name}"
    try:
        return c._http_post_multipart_application_dicom(url, list(parts))
    except requests.exceptions.HTTPError as exc:
        resp = exc.response
        if resp is not None and resp.status_code in (409, 400) and resp.content:
            try:
                return Dataset.from_json(resp.json())
            except ValueError:
                pass
        raise http_failure(node, exc, what) from None
    except (requests.exceptions.RequestException, OSError) as exc:
        raise http_failure(node, exc, what) from None
