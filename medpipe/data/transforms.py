"""MONAI transforms named in YAML: ``{ClassName: {arg: value}}``, resolved only in ``monai.transforms``.

Nothing is evaluated: a name must be a transform class exported by ``monai.transforms``, its
arguments are plain YAML values, and the class is instantiated during validation so that a bad
name or argument fails before any data is read.
"""

from __future__ import annotations

import difflib
import hashlib
import inspect
import json
import warnings
from functools import lru_cache
from typing import Any


@lru_cache(maxsize=1)
def _transform_classes() -> dict[str, type]:
    import logging

    # MONAI announces at import that an optional GPU DICOM decoder is missing: not actionable here
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    import monai.transforms as mt
    from monai.transforms import Transform

    return {
        name: obj for name in dir(mt)
        if not name.startswith("_") and inspect.isclass(obj := getattr(mt, name)) and issubclass(obj, Transform)
    }


def _parse(item: Any) -> tuple[str, dict[str, Any]]:
    if not isinstance(item, dict) or len(item) != 1:
        raise ValueError("each transform is one mapping {TransformName: {arguments}}")
    name, args = next(iter(item.items()))
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise ValueError(f"{name}: arguments must be a mapping, got {type(args).__name__}")
    return str(name), args


def _instantiate(item: Any) -> Any:
    name, args = _parse(item)
    classes = _transform_classes()
    if name not in classes:
        close = difflib.get_close_matches(name, list(classes), n=1)
        raise ValueError(f"unknown MONAI transform {name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module="monai")  # MONAI's own deprecations
            warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")
            return classes[name](**args)
    except TypeError as exc:  # unexpected / missing arguments
        raise ValueError(f"{name}: {exc}") from None
    except Exception as exc:  # MONAI validates values in constructors
        raise ValueError(f"{name}: {type(exc).__name__}: {exc}") from None


def check_transform(item: Any) -> None:
    """Raise ``ValueError`` (one line) unless ``item`` builds a MONAI transform."""
    _instantiate(item)


def build_transforms(spec: list[dict[str, Any]]) -> Any:
    """A ``monai.transforms.Compose`` of the transforms named in ``spec``."""
    from monai.transforms import Compose

    return Compose([_instantiate(item) for item in spec])


def transforms_hash(spec: list[dict[str, Any]]) -> str:
    """Stable hash of a transform list (names and arguments, in order): the key of caches built with it."""
    import monai

    text = json.dumps([_parse(i) for i in spec], sort_keys=True, default=str)
    return hashlib.sha256(f"monai {monai.__version__}\n{text}".encode()).hexdigest()[:16]
