"""Deterministic DICOM UIDs: the same inputs name the same objects, run after run.

Construction (:func:`derive_uid`)
---------------------------------
1. Each part is turned into text with ``str`` and encoded as UTF-8.
2. SHA-256 is taken over the parts, each preceded by its byte length as an 8-byte big-endian
   integer (so ``("ab", "c")`` and ``("a", "bc")`` differ).
3. The first 16 bytes of the digest become a UUID: the version nibble is set to 8 ("custom",
   RFC 9562) and the variant bits to ``10`` (RFC 4122), as ISO/IEC 9834-8 asks of the UUIDs under
   the ``2.25`` arc.
4. The UID is ``"2.25."`` followed by that UUID as a decimal integer: at most 44 characters, well
   within DICOM's 64.

No organisational root is needed (the ``2.25`` arc belongs to UUIDs), and 122 hashed bits make
collisions between different inputs practically impossible. Callers put a namespace in the parts
(``derive_uid("medpipe.score", study_uid, "SEG", "series")``) so that unrelated uses never meet.
"""

from __future__ import annotations

import hashlib

UID_ROOT = "2.25."


def derive_uid(*parts: object) -> str:
    """A ``2.25.<int>`` UID determined by ``parts`` alone (see the module docstring)."""
    if not parts:
        raise ValueError("derive_uid needs at least one part")
    h = hashlib.sha256()
    for part in parts:
        data = str(part).encode("utf-8")
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    b = bytearray(h.digest()[:16])
    b[6] = (b[6] & 0x0F) | 0x80  # version 8: custom (name-based, SHA-256)
    b[8] = (b[8] & 0x3F) | 0x80  # variant: RFC 4122 / 9562
    return f"{UID_ROOT}{int.from_bytes(b, 'big')}"
