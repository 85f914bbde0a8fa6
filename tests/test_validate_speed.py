"""``medpipe validate`` without torch: stage modules import no network code, and transform checks are remembered.

The 2-3 s of an earlier ``validate`` were importing torch (network option classes lived beside the networks)
and MONAI (every transform is built to check it). These tests pin both fixes by what a fresh process imports,
not by a wall-clock time (timings belong in benchmarks).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medpipe.data import transforms as tf

REPO = Path(__file__).resolve().parents[1]
PIPELINE = REPO / "pipelines" / "brain_tumor.yaml"

_PROBE = """
import sys
from medpipe.config import load_pipeline
try:
    load_pipeline(sys.argv[1])
    outcome = "ok"
except Exception as exc:
    outcome = str(exc).splitlines()[0]
print(outcome)
print("torch" in sys.modules, "monai" in sys.modules)
"""


def _validate_in_fresh_process(pipeline: Path, cache: Path) -> tuple[str, str]:
    env = {**os.environ, "MEDPIPE_CACHE_DIR": str(cache)}
    out = subprocess.run([sys.executable, "-c", _PROBE, str(pipeline)], capture_output=True, text=True, env=env,
                         cwd=pipeline.parent, timeout=120, check=True).stdout.strip().splitlines()
    return out[0], out[1]


def test_stage_modules_import_without_torch() -> None:
    """Every built-in stage module (their parameter classes) loads in a process where torch cannot be imported."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'monai'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from medpipe.stages import load_stages\n"
        "print(len(load_stages()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr.strip().splitlines()[-1:]
    assert int(out.stdout) >= 13


def test_second_validation_imports_neither_torch_nor_monai(tmp_path: Path) -> None:
    pipeline = tmp_path / PIPELINE.name
    pipeline.write_text(PIPELINE.read_text())
    cache = tmp_path / "cache"
    assert _validate_in_fresh_process(pipeline, cache) == ("ok", "True True")  # first time: transforms are built
    assert (cache / tf.CHECK_CACHE_NAME).is_file()
    assert _validate_in_fresh_process(pipeline, cache) == ("ok", "False False")


def test_a_cached_problem_is_reported_again_word_for_word(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDPIPE_CACHE_DIR", str(tmp_path))
    item = {"Spacingd": {"keys": ["image"], "pixdimm": [1, 1, 1]}}
    with pytest.raises(ValueError) as first:
        tf.check_transform_cached(item)
    entries = json.loads((tmp_path / tf.CHECK_CACHE_NAME).read_text())
    assert list(entries.values()) == [str(first.value)]
    assert "did you mean 'pixdim'" in str(first.value)
    with pytest.raises(ValueError) as second:
        tf.check_transform_cached(item)
    assert str(second.value) == str(first.value)


def test_a_tampered_cache_cannot_make_run_build_an_unsafe_transform(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache only spares validation the MONAI import; building transforms for a run checks everything again."""
    monkeypatch.setenv("MEDPIPE_CACHE_DIR", str(tmp_path))
    item = {"LoadImaged": {"keys": ["image"], "reader": "os.system"}}
    key = tf.hashlib.sha256((tf._check_context() + json.dumps(item, sort_keys=True)).encode()).hexdigest()
    (tmp_path / tf.CHECK_CACHE_NAME).write_text(json.dumps({key: None}))
    tf.check_transform_cached(item)  # trusted: the cache says it was checked
    with pytest.raises(ValueError, match="not one of MONAI's readers"):
        tf.build_transforms([item])


def test_an_unreadable_cache_is_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDPIPE_CACHE_DIR", str(tmp_path))
    (tmp_path / tf.CHECK_CACHE_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="unknown MONAI transform 'Spacingx'"):
        tf.check_transform_cached({"Spacingx": {"keys": ["image"]}})
    tf.check_transform_cached({"ScaleIntensityd": {"keys": ["image"]}})
    assert len(json.loads((tmp_path / tf.CHECK_CACHE_NAME).read_text())) == 2
