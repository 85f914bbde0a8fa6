"""Burned-in text: which images are quarantined, and the optional pixel check with Tesseract.

Header rule (:func:`burned_in_reason`): an image whose Burned In Annotation is ``YES`` is quarantined,
and so is any ultrasound, secondary capture (SC SOP classes, Modality SC) or "other" (OT) image that does
not say ``NO`` explicitly: those are where scanners and workstations print names and dates into the pixels.
De-identifying the header cannot remove them, so such files are not written unless the user opts in.

Pixel check (:func:`pixel_text`, ``--ocr``): the first frame, scaled to 8 bits between its 0.5th and 99.5th
percentiles (and up to at least 1000 pixels wide), goes through the ``tesseract`` command (Debian packages
``tesseract-ocr`` and ``tesseract-ocr-eng``, checked by :func:`tesseract_path`); words of three or more letters or digits read with confidence >= 60 count, and two or more
flag the image. A frame that cannot be read as a 2-D image, or a failing tesseract, is an error (the caller
quarantines the file), never "no text".
"""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

from medpipe.errors import ConfigError

SECONDARY_CAPTURE = frozenset({
    "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.7.1", "1.2.840.10008.5.1.4.1.1.7.2",
    "1.2.840.10008.5.1.4.1.1.7.3", "1.2.840.10008.5.1.4.1.1.7.4",
})
ULTRASOUND = frozenset({
    "1.2.840.10008.5.1.4.1.1.6.1", "1.2.840.10008.5.1.4.1.1.6.2", "1.2.840.10008.5.1.4.1.1.3.1",
    "1.2.840.10008.5.1.4.1.1.6", "1.2.840.10008.5.1.4.1.1.3",
})
MIN_CONFIDENCE = 60.0
MIN_WORDS = 2
#: seconds one image may take in tesseract: a hanging tesseract fails that file, not the run
TESSERACT_TIMEOUT_S = 120


def burned_in_reason(ds: Any) -> str | None:
    """Why this dataset's pixels may hold burned-in text, or None."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        return None
    flag = str(ds.get("BurnedInAnnotation") or "").strip().upper()
    if flag == "YES":
        return "burned-in annotation: Burned In Annotation is YES"
    if flag == "NO":
        return None
    sop = str(ds.get("SOPClassUID") or "")
    modality = str(ds.get("Modality") or "").upper()
    if sop in SECONDARY_CAPTURE or modality in ("SC", "OT"):
        kind = "secondary capture" if sop in SECONDARY_CAPTURE else f"{modality} image"
        return f"possible burned-in text: {kind} without Burned In Annotation NO"
    if sop in ULTRASOUND or modality == "US":
        return "possible burned-in text: ultrasound image without Burned In Annotation NO"
    return None


def tesseract_path() -> str:
    """The ``tesseract`` executable, checked to have its English language data.

    Raises:
        ConfigError: not installed, or without the ``eng`` data (every image would fail the check).
    """
    path = shutil.which("tesseract")
    if path is None:
        raise ConfigError("--ocr needs the tesseract command, which is not installed",
                          hint="apt-get install tesseract-ocr (Debian/Ubuntu), or leave out --ocr")
    # "List of available languages in "<tessdata>" (n):" then one language per line (stderr in old versions)
    langs = subprocess.run([path, "--list-langs"], capture_output=True, timeout=TESSERACT_TIMEOUT_S, check=False)
    if "eng" not in (langs.stdout + langs.stderr).decode("utf-8", "replace").split():
        raise ConfigError(f"--ocr needs tesseract's English language data ('eng'), which {path} does not list",
                          hint="apt-get install tesseract-ocr-eng (Debian/Ubuntu), or leave out --ocr")
    return path


def _frame_png(ds: Any) -> bytes | None:
    """The first frame as an 8-bit PNG; None for a flat image (no text to read).

    Raises:
        ValueError: the pixel data is not a 2-D frame (the image cannot be checked).
    """
    import io

    import numpy as np
    from PIL import Image

    arr = np.asarray(ds.pixel_array)  # needs Samples per Pixel and Photometric Interpretation
    if int(ds.get("NumberOfFrames") or 1) > 1:  # absent, empty or 0 (pydicom reads one frame): single-frame
        arr = arr[0]
    if int(ds.SamplesPerPixel) != 1:  # colour (3): pydicom's pixel_array is RGB already (it converts YBR)
        arr = arr.mean(axis=-1)  # float64, as numpy averages integers
    if arr.ndim != 2:  # e.g. more frames of pixel data than Number of Frames says
        raise ValueError(f"the first frame is not a 2-D image (pixel array of shape {arr.shape})")
    lo, hi = np.percentile(arr, 0.5), np.percentile(arr, 99.5)
    if hi <= lo:
        return None
    img8 = (np.clip((arr - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        img8 = 255 - img8
    image = Image.fromarray(img8)  # 2-D uint8: mode L
    if image.width < 1000:
        scale = max(1, round(1000 / image.width))
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def pixel_text(ds: Any, tesseract: str | None = None) -> list[str]:
    """Words Tesseract reads in the first frame with confidence >= 60 (3+ letters or digits each).

    Raises:
        ValueError: the first frame is not a 2-D image.
        subprocess.CalledProcessError: tesseract failed.
        subprocess.TimeoutExpired: tesseract took longer than TESSERACT_TIMEOUT_S.
    """
    png = _frame_png(ds)
    if png is None:
        return []
    cmd = [tesseract or tesseract_path(), "stdin", "stdout", "--psm", "11", "-l", "eng", "tsv"]
    # check: a failing tesseract (e.g. no 'eng' language data) must not read as "no text"
    result = subprocess.run(cmd, input=png, capture_output=True, timeout=TESSERACT_TIMEOUT_S, check=True)
    words = []
    for line in result.stdout.decode("utf-8", "replace").splitlines()[1:]:
        cols = line.split("\t")
        if len(cols) < 12:
            continue
        try:
            conf = float(cols[10])
        except ValueError:
            continue
        word = "".join(c for c in cols[11] if c.isalnum())
        if conf >= MIN_CONFIDENCE and len(word) >= 3:
            words.append(word)
    return words


def ocr_reason(ds: Any, tesseract: str | None = None) -> str | None:
    """A quarantine reason when the pixel check reads text (no words are quoted: they may be PHI)."""
    words = pixel_text(ds, tesseract)
    if len(words) >= MIN_WORDS:
        return f"pixel text check: Tesseract read {len(words)} words in the image"
    return None
