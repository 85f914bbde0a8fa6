"""PACS nodes: who to talk to (DIMSE and DICOMweb), as whom, and how, read from a small YAML or TOML file.

::

    # ~/.config/medpipe/pacs.yaml  (or --pacs FILE, or $MEDPIPE_PACS)
    defaults:                 # optional, applies to every node
      our_ae_title: MEDPIPE
      our_port: 11112
    nodes:
      orthanc:
        ae_title: ORTHANC
        host: pacs.example.org
        port: 4242
        dicomweb: https://pacs.example.org/dicom-web   # the DICOMweb root (Orthanc: .../dicom-web)
        auth: {username: ai, password_env: PACS_PASSWORD}
        engine: auto          # C-MOVE by dcmtk (movescu + storescp) when installed (dcmtk: also C-GET; pynetdicom: never)
        tls: {ca_file: /etc/ssl/hospital-ca.pem}

The same in TOML is ``[defaults]`` and ``[nodes.orthanc]`` tables. Unknown keys are errors (a typo must
not silently fall back to a default); every error names the file and the field.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medpipe.errors import ConfigError
from medpipe.user_folders import config_folder

ENV_FILE = "MEDPIPE_PACS"
DEFAULT_NAMES = ("pacs.yaml", "pacs.yml", "pacs.toml")
MAX_FILE_BYTES = 1 << 20

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII without backslash, 16 at most


def check_ae_title(value: str) -> str:
    if not _AE_TITLE.match(value) or not value.strip():
        raise ValueError("an AE title is 1 to 16 printable ASCII characters, no backslash, not only spaces")
    return value.strip()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HttpAuth(_Strict):
    """HTTP basic authentication for DICOMweb, or a bearer token; secrets preferably from the environment."""

    username: str | None = None
    password: str | None = None
    password_env: str | None = None  # name of an environment variable holding the password
    token_env: str | None = None  # name of an environment variable holding a bearer token

    @model_validator(mode="after")
    def _one_kind(self) -> HttpAuth:
        basic = self.username is not None
        if basic == (self.token_env is not None):
            raise ValueError("give either username (with password or password_env) or token_env")
        if basic and (self.password is None) == (self.password_env is None):
            raise ValueError("give exactly one of password and password_env")
        return self

    def resolve_password(self) -> str | None:
        if self.password_env is not None:
            return _env(self.password_env)
        return self.password

    def resolve_token(self) -> str | None:
        return None if self.token_env is None else _env(self.token_env)


def _env(name: str) -> str:
    value = os.environ.get(name)
    if value is None:
        raise ConfigError(f"the PACS node file names the environment variable {name}, which is not set",
                          hint=f"export {name}=... before running medpipe")
    return value


class TlsSettings(_Strict):
    """TLS for DICOMweb (https) and, with ``dimse: true``, for DIMSE associations."""

    ca_file: Path | None = None  # CA bundle the server certificate must chain to (default: the system's)
    cert_file: Path | None = None  # our client certificate (mutual TLS)
    key_file: Path | None = None
    verify: bool = True  # never turn off outside a lab
    dimse: bool = False  # also wrap DIMSE associations in TLS

    @model_validator(mode="after")
    def _pair(self) -> TlsSettings:
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file needs cert_file")
        return self


RetrieveMethod = Literal["move", "get", "wado"]
#: what carries DIMSE pulls: dcmtk's movescu / getscu (C++) or pynetdicom; see medpipe.pacs.dcmtk
Engine = Literal["auto", "pynetdicom", "dcmtk"]


class PacsNode(_Strict):
    """One PACS: its DIMSE address, our identity towards it, its DICOMweb root and how patient to be."""

    name: str
    ae_title: str | None = None  # DIMSE: the PACS's AE title, host and port (leave all three out for a
    host: str | None = None      # DICOMweb-only node)
    port: int | None = Field(None, ge=1, le=65535)
    our_ae_title: str = "MEDPIPE"
    our_port: int = Field(11112, ge=1, le=65535)  # where medpipe's storage SCP listens during a C-MOVE pull
    our_host: str | None = None  # how the PACS reaches us (for the hint line); default: our address towards it
    bind: str = ""  # address the storage SCP binds to ("" = every interface)
    dicomweb: str | None = None  # DICOMweb root URL (QIDO-RS / WADO-RS / STOW-RS prefix)
    auth: HttpAuth | None = None
    tls: TlsSettings | None = None
    timeout: float = Field(30.0, gt=0, le=3600)  # seconds for connecting and for each response
    retries: int = Field(3, ge=0, le=20)  # further attempts after a transient failure (with back-off)
    retry_delay: float = Field(1.0, ge=0, le=300)  # first back-off pause in seconds; doubles each attempt
    retrieve: tuple[RetrieveMethod, ...] = ("move", "get", "wado")  # pull methods tried in this order
    max_pdu: int = Field(1 << 20, ge=0)  # largest PDU we receive (0: unlimited); big PDUs are faster
    parallel: int = Field(4, ge=1, le=32)  # associations (or HTTP requests) at once during a pull, one series each
    engine: Engine = "auto"  # C-MOVE / C-GET by dcmtk's movescu / getscu or by pynetdicom (auto: see dcmtk.py)

    @field_validator("ae_title", "our_ae_title")
    @classmethod
    def _check_ae(cls, v: str | None) -> str | None:
        return None if v is None else check_ae_title(v)

    @model_validator(mode="after")
    def _reachable(self) -> PacsNode:
        dimse = (self.ae_title, self.host, self.port)
        if any(x is not None for x in dimse) and any(x is None for x in dimse):
            raise ValueError("DIMSE needs all of ae_title, host and port")
        if self.host is None and self.dicomweb is None:
            raise ValueError("give ae_title, host and port (DIMSE), or dicomweb (a DICOMweb root URL), or both")
        return self

    @property
    def has_dimse(self) -> bool:
        return self.host is not None

    def dimse_address(self) -> tuple[str, int, str]:
        """(host, port, AE title); a DICOMweb-only node is a ConfigError naming the fix."""
        if self.host is None or self.port is None or self.ae_title is None:
            raise ConfigError(f"PACS node {self.name} has no DIMSE address (ae_title, host, port)",
                              hint="add them to the node, or use DICOMweb (--via dicomweb / wado)")
        return self.host, self.port, self.ae_title

    def dicomweb_url(self) -> str:
        if self.dicomweb is None:
            raise ConfigError(f"PACS node {self.name} has no dicomweb URL",
                              hint="add dicomweb: http://HOST:PORT/dicom-web (Orthanc's DICOMweb root) to the node")
        return self.dicomweb

    @field_validator("dicomweb")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not re.match(r"^https?://[^/\s]+", v):
            raise ValueError("expected an http:// or https:// URL of the DICOMweb root, e.g. "
                             "http://pacs:8042/dicom-web for Orthanc")
        return v.rstrip("/")

    @field_validator("retrieve")
    @classmethod
    def _methods(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v or len(set(v)) != len(v):
            raise ValueError("list each of move, get, wado at most once, at least one")
        return v

    @property
    def address(self) -> str:
        if self.host is None:
            return f"{self.name} ({self.dicomweb})"
        return f"{self.name} ({self.ae_title} at {self.host}:{self.port})"


class NodeFile(BaseModel):
    """The parsed node file: its path and nodes by name."""

    model_config = ConfigDict(frozen=True)
    path: Path | None
    nodes: dict[str, PacsNode]

    def get(self, name: str) -> PacsNode:
        node = self.nodes.get(name)
        if node is not None:
            return node
        import difflib

        where = self.path or "the PACS node file"
        close = difflib.get_close_matches(name, list(self.nodes), n=1)
        known = ", ".join(sorted(self.nodes)) or "none"
        raise ConfigError(f"no PACS node '{name}' in {where} (known: {known})"
                          + (f"; did you mean '{close[0]}'?" if close else ""),
                          hint="add it under nodes: in that file (see the README's PACS section)")


def default_path() -> Path:
    """``$MEDPIPE_PACS``, else ``pacs.yaml`` / ``pacs.toml`` in the user's config folder (the first that exists)."""
    env = os.environ.get(ENV_FILE)
    if env:
        return Path(env).expanduser()
    folder = config_folder()
    for name in DEFAULT_NAMES:
        if (folder / name).is_file():
            return folder / name
    return folder / DEFAULT_NAMES[0]


def load_nodes(path: Path | str | None = None) -> NodeFile:
    """Read and validate a node file (``path``, else :func:`default_path`)."""
    p = Path(path).expanduser() if path is not None else default_path()
    if not p.is_file():
        raise ConfigError(f"PACS node file {p} not found",
                          hint=f"create it (see the README's PACS section), pass --pacs FILE or set ${ENV_FILE}")
    if p.stat().st_size > MAX_FILE_BYTES:
        raise ConfigError(f"{p}: larger than 1 MB; a PACS node file is a few lines")
    raw = _parse(p)
    return nodes_from_dict(raw, p)


def _parse(p: Path) -> Any:
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix.lower() == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # pragma: no cover - Python 3.10
                import tomli as tomllib
            return tomllib.loads(text)
        import yaml

        return yaml.safe_load(text)
    except Exception as exc:  # yaml.YAMLError / tomllib.TOMLDecodeError: say where
        first = str(exc).strip().splitlines()
        raise ConfigError(f"{p}: not valid {'TOML' if p.suffix.lower() == '.toml' else 'YAML'}: "
                          f"{' '.join(line.strip() for line in first)[:200]}") from None


def nodes_from_dict(raw: Any, path: Path | None = None) -> NodeFile:
    """Validate an already parsed node document (``{defaults: {...}, nodes: {name: {...}}}``)."""
    where = str(path) if path is not None else "PACS nodes"
    if not isinstance(raw, dict) or not isinstance(raw.get("nodes"), dict) or not raw["nodes"]:
        raise ConfigError(f"{where}: expected a 'nodes' mapping of node names to settings",
                          hint="see the README's PACS section for the format")
    unknown = set(raw) - {"defaults", "nodes"}
    if unknown:
        raise ConfigError(f"{where}: unknown top-level key(s) {', '.join(sorted(map(str, unknown)))}; "
                          "expected defaults and nodes")
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ConfigError(f"{where}: defaults: expected a mapping")
    nodes: dict[str, PacsNode] = {}
    for name, settings in raw["nodes"].items():
        if not isinstance(settings, dict):
            raise ConfigError(f"{where}: nodes.{name}: expected a mapping of settings")
        merged = {**defaults, **settings, "name": str(name)}
        try:
            nodes[str(name)] = PacsNode.model_validate(merged)
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(x) for x in err["loc"])
            top = str(err["loc"][0]) if err["loc"] else ""
            origin = "defaults" if top in defaults and top not in settings else f"nodes.{name}"
            if err["type"] == "extra_forbidden":
                msg = f"unknown setting '{field}'" + _suggest(field)
                raise ConfigError(f"{where}: {origin}.{field}: {msg}") from None
            raise ConfigError(f"{where}: {origin}{'.' + field if field else ''}: {err['msg']}") from None
    return NodeFile(path=path, nodes=nodes)


def _suggest(field: str) -> str:
    import difflib

    names = list(PacsNode.model_fields) + [f"tls.{k}" for k in TlsSettings.model_fields] + \
        [f"auth.{k}" for k in HttpAuth.model_fields]
    close = difflib.get_close_matches(field, names, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""
