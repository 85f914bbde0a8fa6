"""A pipeline file is data: no route through it runs code, and hostile YAML fails with one line.

Each test names the route it closes. The attack that started this file: a transform entry
``LoadImaged: {keys: [image], reader: os.system, ...}`` made MONAI resolve ``os.system`` with
``pydoc.locate`` and call it while ``medpipe validate`` built the transform.
"""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import tests.toy_stages  # noqa: F401  (registers toy_* stages)
from medpipe.cli import app
from medpipe.config import MAX_YAML_VALUES, load_pipeline
from medpipe.data.transforms import check_transform
from medpipe.errors import ConfigError


def pipeline_with(tmp_path: Path, transform: str) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(textwrap.dedent("""\
        name: attack
        stages:
          - stage: toy_train
            train_transforms:
              - {t}
        """).format(t=transform))
    return path


@pytest.mark.parametrize("route", [
    # LoadImage(d).reader: any dotted name is located and called with the reader's arguments
    "LoadImaged: {{keys: [image], reader: os.system, command: 'touch {marker}'}}",
    "LoadImage: {{reader: os.system, command: 'touch {marker}'}}",
    "LoadImaged: {{keys: [image], reader: [NibabelReader, os.system], command: 'touch {marker}'}}",
    # SaveImage(d).writer: located the same way (called when saving)
    "SaveImaged: {{keys: [image], writer: subprocess.getoutput, output_dir: '{marker}'}}",
])
def test_validate_never_runs_a_named_function(tmp_path: Path, route: str) -> None:
    marker = tmp_path / "pwned"
    path = pipeline_with(tmp_path, route.format(marker=marker))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code != 0, result.output
    assert not marker.exists(), "the pipeline file ran a shell command"
    assert "would be resolved and run as Python code" in result.output
    assert "line 5" in result.output  # names where in the file


@pytest.mark.parametrize(("item", "message"), [
    ({"LoadImaged": {"keys": ["image"], "reader": "builtins.exec"}}, "LoadImaged.reader: 'builtins.exec' is not"),
    ({"LoadImaged": {"keys": ["image"], "reader": {"name": "os.system"}}}, "LoadImaged.reader:"),
    ({"SaveImage": {"writer": "os.system"}}, "SaveImage.writer: 'os.system' is not"),
    # function-typed arguments: YAML has no functions, so a value there is a name waiting to be resolved
    ({"SaveImaged": {"keys": ["image"], "output_name_formatter": "os.system"}}, "output_name_formatter: takes a"),
    ({"CropForegroundd": {"keys": ["image"], "source_key": "image", "select_fn": "os.system"}}, "select_fn: takes a"),
    ({"DataStatsd": {"keys": ["image"], "additional_info": "os.system"}}, "additional_info: takes a"),
    ({"Compose": {"transforms": ["os.system"]}}, "Compose.transforms: takes a"),
    # transforms whose job is to call functions or import transforms from other packages by name
    ({"Lambdad": {"keys": ["image"], "func": "os.system"}}, "Lambdad runs Python functions"),
    ({"RandLambda": {"func": "os.system"}}, "RandLambda runs Python functions"),
    ({"TorchVisiond": {"keys": ["image"], "name": "AutoAugment"}}, "TorchVisiond runs Python functions"),
    ({"TorchIO": {"name": "RandomAffine"}}, "TorchIO runs Python functions"),
    ({"CuCIMd": {"keys": ["image"], "name": "color_jitter"}}, "CuCIMd runs Python functions"),
])
def test_every_route_to_code_is_refused(item: dict, message: str) -> None:
    with pytest.raises(ValueError) as exc:
        check_transform(item)
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("item", [
    {"LoadImaged": {"keys": ["image"], "reader": "NibabelReader"}},
    {"LoadImaged": {"keys": ["image"], "reader": "pydicomreader"}},
    {"LoadImaged": {"keys": ["image"], "reader": ["PydicomReader", "NibabelReader"]}},
    {"SaveImaged": {"keys": ["image"], "writer": "NibabelWriter"}},
    {"IntensityStatsd": {"keys": ["image"], "ops": ["mean", "std"], "key_prefix": "orig"}},  # names of statistics
    {"CropForegroundd": {"keys": ["image"], "source_key": "image", "margin": 2}},
])
def test_monai_own_names_and_plain_values_still_work(item: dict) -> None:
    check_transform(item)


def write(tmp_path: Path, content: str | bytes) -> Path:
    path = tmp_path / "p.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def test_alias_bomb_fails_fast_with_one_line(tmp_path: Path) -> None:
    # the "billion laughs": 9 levels of 9 aliases = 9**9 values from ~700 bytes
    lines = ["name: bomb", "a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    lines.append("stages: [*a9]")
    path = write(tmp_path, "\n".join(lines) + "\n")
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as exc:
        load_pipeline(path)
    assert time.perf_counter() - t0 < 5
    assert f"more than {MAX_YAML_VALUES} values" in str(exc.value) and "\n" not in str(exc.value)


def test_self_referencing_alias_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "name: loop\nstages: &s [*s]\n")
    with pytest.raises(ConfigError, match="refers to itself"):
        load_pipeline(path)


def test_deep_nesting_is_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, "name: deep\nstages: " + "[" * 50_000 + "]" * 50_000 + "\n")
    with pytest.raises(ConfigError) as exc:
        load_pipeline(path)
    assert "\n" not in str(exc.value)


def test_non_utf8_file_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, b"name: x\n# caf\xe9\nstages: []\n")
    with pytest.raises(ConfigError, match=r"line 2: not UTF-8 text"):
        load_pipeline(path)


@pytest.mark.parametrize("stage", ["toy_make", "null", "3"])
def test_stage_that_is_not_a_mapping_is_one_line(tmp_path: Path, stage: str) -> None:
    path = write(tmp_path, f"name: x\nstages:\n  - {stage}\n")
    with pytest.raises(ConfigError) as exc:
        load_pipeline(path)
    assert str(exc.value).startswith("stages[0]: each stage needs 'stage: <kind>'")


@pytest.mark.parametrize(("line", "field"), [("seed: -1", "seed"), ("seed: 4294967296", "seed"),
                                             ("cpu_threads: 1000000", "cpu_threads")])
def test_top_level_numbers_are_bounded(tmp_path: Path, line: str, field: str) -> None:
    path = write(tmp_path, f"name: x\n{line}\nstages:\n  - stage: toy_make\n")
    with pytest.raises(ConfigError, match=rf"^{field}: .* line 2\)$"):
        load_pipeline(path)


def test_huge_file_is_refused_unread(tmp_path: Path) -> None:
    path = write(tmp_path, "name: x\n" + "#" * 2_000_000 + "\n")
    with pytest.raises(ConfigError, match="not a pipeline file"):
        load_pipeline(path)


# -- bounds: every numeric parameter of every stage ---------------------------------------------------------


def _unbounded(schema: dict, defs: dict, path: str, out: list[str]) -> None:
    if "$ref" in schema:
        return _unbounded(defs[schema["$ref"].split("/")[-1]], defs, path, out)
    for key in ("anyOf", "oneOf", "allOf"):
        for sub in schema.get(key, []):
            _unbounded(sub, defs, path, out)
    kind = schema.get("type")
    if kind in ("integer", "number") and not any(k in schema for k in ("minimum", "exclusiveMinimum", "enum",
                                                                         "const")):
        out.append(path)
    if kind == "array":
        if isinstance(schema.get("items"), dict):
            _unbounded(schema["items"], defs, path + "[]", out)
        for i, item in enumerate(schema.get("prefixItems", [])):
            _unbounded(item, defs, f"{path}[{i}]", out)
    for name, sub in schema.get("properties", {}).items():
        _unbounded(sub, defs, f"{path}.{name}", out)
    if isinstance(schema.get("additionalProperties"), dict):
        _unbounded(schema["additionalProperties"], defs, path + ".*", out)


def test_every_numeric_parameter_of_every_stage_has_a_lower_bound() -> None:
    """The class behind ``roi_size: [0, -1, 5]`` and negative ``channels`` being accepted."""
    from medpipe.config import PipelineConfig
    from medpipe.stage import REGISTRY
    from medpipe.stages import load_stages

    load_stages()
    found: list[str] = []
    for kind, d in sorted(REGISTRY.items()):
        if kind.startswith("toy_"):
            continue
        schema = d.params.model_json_schema()
        _unbounded(schema, schema.get("$defs", {}), kind, found)
    top = PipelineConfig.model_json_schema()
    _unbounded(top, top.get("$defs", {}), "pipeline", found)
    assert found == [], f"numeric parameters without bounds: {found}"


@pytest.mark.parametrize(("key", "value", "message"), [
    ("roi_size", "[0, -1, 5]", "roi_size[0]: input should be greater than or equal to 1"),
    ("channels", "[8, -16]", "channels[1]: input should be greater than or equal to 1"),
    ("strides", "[2, 0]", "strides[1]: input should be greater than or equal to 1"),
    ("epochs", "0", "epochs: input should be greater than or equal to 1"),
    ("lr", "-0.1", "lr: input should be greater than 0"),
])
def test_bad_numbers_fail_validation_with_one_line_each(tmp_path: Path, key: str, value: str, message: str) -> None:
    path = write(tmp_path, f"name: x\nstages:\n  - stage: train_segmenter\n    datalist: d.json\n    {key}: {value}\n")
    with pytest.raises(ConfigError) as exc:
        load_pipeline(path)
    lines = str(exc.value).splitlines()
    assert any(line.startswith(f"stages[0] (train_segmenter).{message}") and line.endswith("line 5)")
               for line in lines), lines
