"""MONAI transforms named in YAML: ``{ClassName: {arg: value}}``, resolved only in ``monai.transforms``.

Nothing is evaluated: a name must be a transform class exported by ``monai.transforms``, its
arguments are plain YAML values, and the class is instantiated during validation so that a bad
name or argument fails before any data is read.

**No code from a pipeline file.** Some MONAI arguments are not plain data: ``LoadImage(d)``'s
``reader`` and ``SaveImage(d)``'s ``writer`` accept any dotted Python name, which MONAI resolves with
``pydoc.locate`` and *calls* (``reader: os.system`` would run a shell command while the transform is
built, i.e. during ``medpipe validate``). :func:`check_safe` runs before anything is instantiated:

* ``reader`` / ``writer`` (in any transform, at any depth of a list) must be one of MONAI's own
  reader / writer names (:data:`SAFE_READERS`, :data:`SAFE_WRITERS`);
* an argument whose type is only a function or class (``func``, ``select_fn``, ``output_name_formatter``,
  ``additional_info``, ``transforms``, ...) cannot be given at all: YAML has no functions, and a
  string there would be a name for something to resolve;
* transforms whose purpose is to call user functions or resolve names in other packages
  (``Lambda``, ``TorchVision``, ``TorchIO``, ``CuCIM`` and their variants) are refused.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import inspect
import json
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator


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


#: MONAI's own image readers (class names, and the lower-case keys of ``monai.transforms.io.array.SUPPORTED_READERS``)
SAFE_READERS: frozenset[str] = frozenset({
    "ITKReader", "NibabelReader", "NumpyReader", "PILReader", "PydicomReader", "NrrdReader",
    "itkreader", "nibabelreader", "numpyreader", "pilreader", "pydicomreader", "nrrdreader",
})
#: MONAI's own image writers
SAFE_WRITERS: frozenset[str] = frozenset({"ITKWriter", "NibabelWriter", "PILWriter"})
#: arguments MONAI resolves to a Python object by name, and the names allowed in each
NAMED_OBJECTS: dict[str, frozenset[str]] = {"reader": SAFE_READERS, "writer": SAFE_WRITERS}
#: transforms (and their d / D / Dict variants) that call user functions or import from other packages by name
FORBIDDEN_TRANSFORMS: tuple[str, ...] = ("Lambda", "RandLambda", "TorchVision", "RandTorchVision", "TorchIO",
                                         "RandTorchIO", "CuCIM", "RandCuCIM")
_PLAIN_TYPES = ("str", "int", "float", "bool", "dict", "list", "tuple", "NdarrayOrTensor", "Number")


def _forbidden_classes() -> set[type]:
    classes = _transform_classes()
    return {classes[n + suffix] for n in FORBIDDEN_TRANSFORMS for suffix in ("", "d", "D", "Dict")
            if n + suffix in classes}


def _function_only(annotation: Any) -> bool:
    """True for an argument typed as a function or class only (no plain-data alternative)."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    if not any(t in text for t in ("Callable", "type[", "Type[")):
        return False
    rest = _strip_brackets(text, ("Callable", "type", "Type"))
    return not any(t in rest for t in _PLAIN_TYPES)


def _strip_brackets(text: str, heads: tuple[str, ...]) -> str:
    """``text`` without each ``Head[...]`` (balanced brackets) of the given heads."""
    out, i = "", 0
    while i < len(text):
        head = next((h for h in heads if text.startswith(h + "[", i)), None)
        if head is None:
            if any(text.startswith(h, i) and not text[i + len(h): i + len(h) + 1].isalnum() for h in heads):
                i += len(next(h for h in heads if text.startswith(h, i)))
                continue
            out += text[i]
            i += 1
            continue
        depth, i = 0, i + len(head)
        while i < len(text):
            depth += {"[": 1, "]": -1}.get(text[i], 0)
            i += 1
            if depth == 0:
                break
    return out


def check_safe(name: str, cls: type, args: dict[str, Any]) -> None:
    """Refuse arguments that MONAI would resolve to code (see the module docstring); ``ValueError`` (one line)."""
    if cls in _forbidden_classes():
        raise ValueError(f"{name} runs Python functions or imports transforms from other packages by name, which "
                         "a pipeline file cannot do (pipeline files hold data only); use MONAI's own transforms")
    for arg, value in args.items():
        allowed = NAMED_OBJECTS.get(arg)
        if allowed is not None:
            values = value if isinstance(value, (list, tuple)) else [value]
            for v in values:
                if v is None:
                    continue
                if not isinstance(v, str) or v not in allowed:
                    raise ValueError(
                        f"{name}.{arg}: {v!r} is not one of MONAI's {arg}s ({', '.join(sorted(a for a in allowed if a[0].isupper()))}); "
                        f"other names would be resolved and run as Python code")
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):  # pragma: no cover - every MONAI transform has an inspectable __init__
        return
    for arg, value in args.items():
        p = params.get(arg)
        if p is not None and arg not in NAMED_OBJECTS and value is not None and _function_only(p.annotation):
            raise ValueError(f"{name}.{arg}: takes a Python function or class, which a pipeline file cannot give "
                             "(pipeline files hold data only); leave it out")


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
    check_safe(name, classes[name], args)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module="monai")  # MONAI's own deprecations
            warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")
            return classes[name](**args)
    except TypeError as exc:  # unexpected / missing arguments
        raise ValueError(f"{name}: {_argument_problem(classes[name], args, exc)}") from None
    except Exception as exc:  # MONAI validates values in constructors
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ValueError(f"{name}: {type(exc).__name__}: {first}") from None


def _argument_problem(cls: type, args: dict[str, Any], exc: TypeError) -> str:
    """``unknown argument 'keyz' (did you mean 'keys'?)`` for a misspelt argument, else the TypeError's text."""
    try:
        known = [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]
    except (TypeError, ValueError):  # pragma: no cover
        return str(exc)
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(cls).parameters.values())
    unknown = [a for a in args if a not in known]
    if unknown and not accepts_any:
        parts = []
        for a in unknown:
            close = difflib.get_close_matches(a, known, n=1)
            parts.append(f"unknown argument {a!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        return "; ".join(parts) + f"; it takes {', '.join(known)}"
    missing = [p.name for p in inspect.signature(cls).parameters.values()
               if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
               and p.name != "self" and p.name not in args]
    if missing:
        return f"missing argument(s) {', '.join(missing)}"
    return str(exc).replace(f"{cls.__name__}.__init__() ", "")


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


CHECK_CACHE_NAME = "transform-checks.json"
#: at most this many checked transforms are remembered (the oldest are forgotten first)
CHECK_CACHE_SIZE = 4096


def _check_cache_path() -> Path:
    from medpipe.user_folders import cache_folder

    return cache_folder() / CHECK_CACHE_NAME


@lru_cache(maxsize=1)
def _check_context() -> str:
    """What a check's outcome depends on besides the transform: MONAI's version and this module's code."""
    from importlib.metadata import version

    return f"monai {version('monai')}\n{hashlib.sha256(Path(__file__).read_bytes()).hexdigest()}\n"


def _read_check_cache(path: Path) -> dict[str, str | None]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def check_transform_cached(item: Any) -> None:
    """:func:`check_transform`, remembering each outcome in the user's cache folder
    (:func:`medpipe.user_folders.cache_folder`, ``transform-checks.json``) keyed by the transform, MONAI's
    version and this module's code, so that validating an unchanged transform list does not import MONAI
    (and torch): the 2-3 s that dominate ``medpipe validate``. Only validation uses it: ``medpipe run``
    builds every transform with :func:`build_transforms`, which checks again, so a tampered cache file
    cannot let an unsafe transform run. A cache that cannot be read or written is ignored."""
    try:
        text = json.dumps(item, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError):
        check_transform(item)
        return
    key = hashlib.sha256((_check_context() + text).encode()).hexdigest()
    path = _check_cache_path()
    cache = _read_check_cache(path)
    if key in cache:
        problem = cache[key]
        if problem is None:
            return
        raise ValueError(str(problem))
    try:
        check_transform(item)
        problem = None
    except ValueError as exc:
        problem = str(exc)
    cache[key] = problem
    with contextlib.suppress(OSError):
        from medpipe.io import write_text_atomic

        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(dict(list(cache.items())[-CHECK_CACHE_SIZE:])))
    if problem is not None:
        raise ValueError(problem)


def _checked(item: dict[str, Any]) -> dict[str, Any]:
    check_transform_cached(item)
    return item


#: a stage parameter holding one MONAI dictionary transform ``{ClassName: {arg: value, ...}}``, checked by
#: building it during validation (outcomes cached: :func:`check_transform_cached`)
TransformSpec = Annotated[dict[str, dict[str, Any] | None], AfterValidator(_checked)]
TransformList = list[TransformSpec]


def tolerate_missing_keys(spec: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``spec`` with ``allow_missing_keys: true`` on every dictionary transform (for items without labels)."""
    from medpipe.data.transforms import _transform_classes

    classes = _transform_classes()
    out = []
    for item in spec:
        name, args = next(iter(item.items()))
        args = dict(args or {})
        cls = classes.get(name)
        if cls is not None and "allow_missing_keys" in inspect.signature(cls).parameters:
            args.setdefault("allow_missing_keys", True)
        out.append({name: args})
    return out


def set_random_state(transform: Any, seed: int) -> None:
    """Seed every random transform of a Compose (reproducible augmentation)."""
    if hasattr(transform, "set_random_state"):
        transform.set_random_state(seed=seed % (2**32))
