"""The de-identification key and everything derived from it: UIDs, pseudonyms, date shifts.

Key file
--------
A text file ``medpipe-deid-key v1`` + newline + 64 hex digits (32 random bytes from ``secrets``), created
with mode 0600 when absent (:func:`load_or_create_key`). Keep it outside the data you share; medpipe
never copies it into an output. The same key gives the same mapping on every run and machine; another
key gives unrelated UIDs and pseudonyms.

Constructions (all HMAC-SHA256 with the key; ``purpose`` strings keep the uses apart)
--------------------------------------------------------------------------------
The message is the purpose string, then each part as 0x00, its UTF-8 length (4 bytes, big-endian) and its
UTF-8 bytes; ``x 0x00 y`` below is short for that.

* **UID**: ``HMAC(key, "medpipe.deid.uid" 0x00 uid)``; the first 16 bytes become a UUID (version nibble 8,
  RFC 9562 variant bits, as ISO/IEC 9834-8 asks of ``2.25`` UIDs), written ``2.25.<decimal>`` (at most 44
  characters). Unlike an unsalted hash, nobody without the key can confirm that a pseudonymous UID stands
  for a given original UID.
* **Patient pseudonym**: ``HMAC(key, "medpipe.deid.patient" 0x00 issuer 0x00 patient_id)`` -> ``"P"`` + the
  first 12 base32 characters of its first 10 bytes (60 bits).
* **Date shift**: the same patient identity under ``"medpipe.deid.date-shift"``; its first 8 bytes as a
  big-endian number n give ``-(1 + n mod 3652)`` days, in ``[-3652, -1]`` (dates move back by 1 day to 10
  years, the same for every study of the patient).
* **File reference**: a source file's relative path under ``"medpipe.deid.file"`` -> ``"F"`` + 16 hex digits
  (what ``rejected.csv`` names; the map holds the path).
* **Key id**: the first 16 hex digits of ``HMAC(key, "medpipe.deid.key-id")``, recorded with outputs so
  a map or an output folder can be matched to its key without revealing it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

from medpipe.errors import ConfigError

HEADER = "medpipe-deid-key v1"
UID_ROOT = "2.25."
#: largest date shift back, in days
MAX_SHIFT_DAYS = 3652


class DeidKey:
    """A loaded key; every keyed derivation of medpipe's de-identification goes through it."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ConfigError("de-identification key too short (need at least 16 bytes)")
        self._secret = secret
        self.key_id = self._mac("medpipe.deid.key-id").hex()[:16]
        self._uid_cache: dict[str, str] = {}

    def __repr__(self) -> str:  # never show the secret
        return f"DeidKey(id={self.key_id})"

    def _mac(self, purpose: str, *parts: str) -> bytes:
        h = hmac.new(self._secret, purpose.encode(), hashlib.sha256)
        for p in parts:
            data = p.encode("utf-8")
            h.update(b"\x00" + len(data).to_bytes(4, "big") + data)
        return h.digest()

    def uid(self, original: str) -> str:
        """The pseudonymous ``2.25.`` UID of ``original`` (cached: one export repeats its UIDs)."""
        cached = self._uid_cache.get(original)
        if cached is not None:
            return cached
        b = bytearray(self._mac("medpipe.deid.uid", original)[:16])
        b[6] = (b[6] & 0x0F) | 0x80  # UUID version 8 (custom)
        b[8] = (b[8] & 0x3F) | 0x80  # RFC 4122 / 9562 variant
        new = f"{UID_ROOT}{int.from_bytes(b, 'big')}"
        if len(self._uid_cache) > 200_000:
            self._uid_cache.clear()
        self._uid_cache[original] = new
        return new

    def patient_pseudonym(self, patient_id: str, issuer: str) -> str:
        digest = self._mac("medpipe.deid.patient", issuer, patient_id)
        return "P" + base64.b32encode(digest[:10]).decode()[:12]

    def date_shift_days(self, patient_id: str, issuer: str) -> int:
        """Days to add to every date of this patient (negative, never 0)."""
        n = int.from_bytes(self._mac("medpipe.deid.date-shift", issuer, patient_id)[:8], "big")
        return -(1 + n % MAX_SHIFT_DAYS)

    def file_ref(self, relpath: str) -> str:
        return "F" + self._mac("medpipe.deid.file", relpath).hex()[:16]


def _parse(text: str, path: Path) -> bytes:
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if len(lines) != 2 or lines[0] != HEADER:
        raise ConfigError(f"{path}: not a medpipe de-identification key file (expected '{HEADER}' and a hex line)",
                          hint="point --key at the file medpipe created, or at a new path to create one")
    try:
        return bytes.fromhex(lines[1])
    except ValueError as exc:
        raise ConfigError(f"{path}: the key line is not hexadecimal") from exc


def load_key(path: Path | str) -> DeidKey:
    """Read an existing key file.

    Raises:
        ConfigError: missing or malformed key file.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{path}: no such key file", hint="give the key the data was de-identified with")
    # a binary file given by mistake (a DICOM file...) is "not a key file", not a decoding crash
    return DeidKey(_parse(path.read_text(encoding="utf-8", errors="replace"), path))


def load_or_create_key(path: Path | str) -> tuple[DeidKey, bool]:
    """The key in ``path``; a new random key is written there first (mode 0600) if the file is absent.

    Returns the key and whether it was created.
    """
    path = Path(path).expanduser()
    if path.exists():
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            import logging

            logging.getLogger(__name__).warning("%s: key file is readable by others (mode %o); chmod 600 it", path, mode)
        return load_key(path), False
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_bytes(32)
    # O_EXCL: never overwrite a key another process created meanwhile; 0600 from the start
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return load_key(path), False
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(f"{HEADER}\n{secret.hex()}\n")
    os.chmod(path, 0o600)  # in case the umask took bits away... or a filesystem ignored the mode
    return DeidKey(secret), True
