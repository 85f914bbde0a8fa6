"""The streaming volume writer (``stream_volume``) writes the very bytes of the in-memory path.

``build_volume`` + ``write_nifti`` + ``write_preview`` is the reference: it holds the whole volume and
hands it to nibabel. ``stream_volume`` writes each source frame straight into the output file and keeps
only three preview planes. For every kind of stack ingest streams (scaled integers, per-slice rescale in
float32, mixed signed / unsigned files, 12-bit signed values, 4D, a single slice, oblique) both must give
identical NIfTI and PNG files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medpipe.dicom.header import read_header
from medpipe.dicom.preview import write_preview, write_preview_planes
from medpipe.dicom.series import Stack, group_stacks
from medpipe.dicom.volume import build_volume, layout, nifti_header, stream_volume, write_nifti
from tests.dicom_factory import CORONAL, Geometry, oblique_iop, pattern, write_series

SHAPE = (17, 12, 9)


def _stack(folder: Path) -> Stack:
    headers = []
    for p in sorted(folder.rglob("*.dcm")):
        with open(p, "rb") as fh:
            headers.append((str(p), read_header(fh, p.stat().st_size)))
    (stack,) = group_stacks(headers)
    return stack


def _series(kind: str, folder: Path) -> None:
    if kind == "scaled":
        write_series(folder, pattern(SHAPE), Geometry(), intercepts=-1024.0)
    elif kind == "per_slice_rescale":
        write_series(folder, pattern(SHAPE), Geometry(iop=oblique_iop(10, -20)), slopes=[1 + k / 7 for k in range(9)],
                     intercepts=[k * 3.5 for k in range(9)])
    elif kind == "signed_12_bit":
        data = pattern(SHAPE, dtype=np.int16, base=-1500).clip(-2048, 2047).astype(np.int16)
        write_series(folder, data, Geometry(iop=CORONAL), bits_stored=12)
    elif kind == "four_d":
        write_series(folder, pattern((*SHAPE, 3)), Geometry(), modality="MR")
    elif kind == "single_slice":
        write_series(folder, pattern((17, 12, 1)), Geometry())
    elif kind == "mixed_signedness":  # one slope for all, unsigned and signed files: int32 output
        write_series(folder, pattern((17, 12, 4)), Geometry(), tag="u", series_uid="1.2.3.4.5", drop=[2, 3])
        signed = pattern((17, 12, 4), dtype=np.int16, seed=1)
        write_series(folder, signed, Geometry(), tag="s", series_uid="1.2.3.4.5", drop=[0, 1])
    else:
        raise ValueError(kind)


@pytest.mark.parametrize("kind", ["scaled", "per_slice_rescale", "signed_12_bit", "four_d", "single_slice",
                                  "mixed_signedness"])
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("threads", [1, 3])
def test_stream_volume_writes_the_bytes_of_the_in_memory_path(tmp_path: Path, kind: str, suffix: str,
                                                              threads: int) -> None:
    _series(kind, tmp_path / "src")
    stack = _stack(tmp_path / "src")
    assert stack.status != "rejected" and not stack.resample, stack.reasons
    volume = build_volume(stack)
    write_nifti(volume, tmp_path / f"ref{suffix}", tr_seconds=0.5)
    write_preview(volume.data, volume.affine, tmp_path / "ref.png", "title")

    lay, planes = stream_volume(stack, tmp_path / f"new{suffix}", tr_seconds=0.5, threads=threads)
    write_preview_planes(planes, lay.shape[:3], lay.affine, tmp_path / "new.png", "title")
    assert lay.shape == volume.shape and lay.dtype == volume.dtype and lay.scale == volume.scale
    assert np.array_equal(lay.affine, volume.affine) and lay.spacing == volume.spacing
    ref, new = (tmp_path / f"ref{suffix}").read_bytes(), (tmp_path / f"new{suffix}").read_bytes()
    assert len(new) == len(ref) and new == ref
    assert (tmp_path / "new.png").read_bytes() == (tmp_path / "ref.png").read_bytes()
    assert len(nifti_header(layout(stack), 0.5)) == 352


def test_stream_volume_unreadable_file_writes_nothing(tmp_path: Path) -> None:
    from medpipe.dicom.volume import PixelReadErrors
    from tests.dicom_factory import truncate_copy

    w = write_series(tmp_path / "src", pattern(SHAPE), Geometry())
    stack = _stack(tmp_path / "src")
    truncate_copy(w.files[4], w.files[4], keep_bytes_of_pixel_data=10)  # damaged after the scan
    with pytest.raises(PixelReadErrors) as exc:
        stream_volume(stack, tmp_path / "out" / "v.nii.gz", threads=2)
    assert [e.key for e in exc.value.errors] == [str(w.files[4])]
    assert not (tmp_path / "out" / "v.nii.gz").exists()
    assert not [p for p in (tmp_path / "out").iterdir()]  # no temporary left either


def test_ingest_of_a_plain_series_does_not_import_nibabel(tmp_path: Path) -> None:
    """Importing nibabel costs 40-130 ms: the common path (a series written without resampling) needs none of it."""
    import subprocess
    import sys

    write_series(tmp_path / "src", pattern(SHAPE), Geometry())
    code = ("import sys; from medpipe.ingest import ingest; r = ingest(sys.argv[1], sys.argv[2], workers=2); "
            "assert r.volumes[0]['status'] == 'ok'; print(sorted(m for m in sys.modules if m.startswith('nibabel')))")
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "src"), str(tmp_path / "out")],
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], check=True)
    assert res.stdout.strip() == "[]", res.stdout
