"""Deterministic UIDs."""

from __future__ import annotations

import uuid

import pydicom

from medpipe.dicom.uids import derive_uid


def test_derive_uid_is_a_deterministic_uuid_uid() -> None:
    a = derive_uid("medpipe", "x", 1)
    assert a == derive_uid("medpipe", "x", 1) and a != derive_uid("medpipe", "x", 2)
    assert derive_uid("ab", "c") != derive_uid("a", "bc")
    assert a.startswith("2.25.") and len(a) <= 64 and pydicom.uid.UID(a).is_valid
    u = uuid.UUID(int=int(a[5:]))
    assert u.version == 8 and u.variant == uuid.RFC_4122
