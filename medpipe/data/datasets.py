"""MONAI datasets over datalist items, with caching ``none | memory | disk``.

* ``none``: :class:`monai.data.Dataset`; every transform runs on every access.
* ``memory``: :class:`monai.data.CacheDataset` (everything cached when the dataset is made).
* ``disk``: :class:`monai.data.PersistentDataset` in ``cache_dir/transforms-<hash>``, one ``.pt`` file
  per item.

**What is cached.** For ``memory`` and ``disk`` MONAI caches the output of the transforms *up to the
first random one* (the first ``Randomizable``, e.g. ``RandCropByPosNegLabeld``, or the first
object that is not a MONAI ``Transform``); that transform and everything after it run on every
access, so augmentation stays random from epoch to epoch. Put deterministic, expensive transforms
(loading, orientation, resampling, normalisation) first.

**Cache keys (disk).** MONAI's PersistentDataset names a cache file by a hash of the *item* only,
so by default a changed transform list silently reuses stale tensors. Here the cache folder is
named by :func:`medpipe.data.transforms.transforms_hash` of the whole transform list (names and
arguments, MONAI version), and the file name by a hash of the item *and of the size and mtime of
every file it names*: changing the transforms, the item or a file it points to never returns stale
data. Old folders are not deleted automatically (``cache_dir`` may be shared by runs).

**Metadata survives the disk cache.** MONAI's default (``track_meta=False``) drops MetaTensor
metadata (affine, applied operations) from cached items, and ``track_meta=True`` files cannot be
read back with ``torch.load(weights_only=True)``. The disk cache here stores each MetaTensor as its
plain tensor plus its metadata converted to tensors / strings / numbers, and rebuilds the
MetaTensor on load, so a disk-cached item equals the uncached one (values, affine, applied
operations) and loading never unpickles arbitrary objects.

Items: keys whose value is ``None`` (``label`` / ``class`` of unlabelled studies) are dropped, because
PyTorch's collate cannot batch ``None``.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from copy import deepcopy
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from monai.data import CacheDataset, Dataset, MetaTensor, PersistentDataset

from medpipe.data.transforms import build_transforms, transforms_hash
from medpipe.io import write_text_atomic

log = logging.getLogger(__name__)

CacheMode = Literal["none", "memory", "disk"]

#: bump when the on-disk format of cached items changes
DISK_FORMAT = "1"


def cache_folder(cache_dir: Path | str, transforms_spec: list[dict[str, Any]]) -> Path:
    """The disk-cache folder of a transform list: ``cache_dir/transforms-<hash of the list>``."""
    return Path(cache_dir) / f"transforms-{transforms_hash(transforms_spec)}-v{DISK_FORMAT}"


def item_hash(item: dict[str, Any]) -> bytes:
    """Cache key of one item: its content plus name, size and mtime of every existing file it names."""
    h = hashlib.sha256(json.dumps(item, sort_keys=True, default=str).encode())

    def visit(value: Any) -> None:
        if isinstance(value, str) and value and len(value) < 4096:
            try:
                st = os.stat(value)
            except (OSError, ValueError):
                return
            h.update(f"\0{value}\0{st.st_size}\0{st.st_mtime_ns}".encode())
        elif isinstance(value, dict):
            for k in sorted(value):
                visit(value[k])
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v)

    visit(item)
    return h.hexdigest().encode()


def clean_items(items: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of ``items`` without ``None`` values (the default collate cannot batch them)."""
    return [{k: v for k, v in it.items() if v is not None} for it in items]


def make_dataset(
    items: Sequence[dict[str, Any]],
    transforms_spec: list[dict[str, Any]],
    cache: CacheMode = "none",
    cache_dir: Path | str | None = None,
    *,
    workers: int | None = 1,
) -> Any:
    """A MONAI dataset of ``items`` (datalist entries) transformed by ``transforms_spec`` (YAML list).

    ``cache``: ``none`` (``Dataset``), ``memory`` (``CacheDataset``: builds its cache now, with
    ``workers`` threads) or ``disk`` (``PersistentDataset`` under ``cache_folder(cache_dir, spec)``).
    See the module docstring for what is cached and how the disk cache is keyed.
    """
    transform = build_transforms(transforms_spec)
    data = clean_items(items)
    if cache == "none":
        return Dataset(data, transform)
    if cache == "memory":
        return CacheDataset(data, transform, cache_rate=1.0, num_workers=workers, progress=False, copy_cache=True)
    if cache == "disk":
        if cache_dir is None:
            raise ValueError("cache='disk' needs a cache_dir")
        folder = cache_folder(cache_dir, transforms_spec)
        folder.mkdir(parents=True, exist_ok=True)
        spec_file = folder / "transforms.json"
        if not spec_file.is_file():  # for people looking into the cache
            write_text_atomic(spec_file, json.dumps(transforms_spec, indent=1, default=str) + "\n")
        return MetaPersistentDataset(data, transform, cache_dir=folder, hash_func=item_hash)
    raise ValueError(f"cache must be 'none', 'memory' or 'disk', got {cache!r}")


# -- the disk cache ----------------------------------------------------------------------------------

_MT, _ND, _TD, _ND_DT = "__metatensor__", "__ndarray__", "__torch_dtype__", "__numpy_dtype__"


class _Unstorable(TypeError):
    pass


def _encode(value: Any) -> Any:
    """``value`` with MetaTensors / numpy values turned into what ``torch.load(weights_only=True)`` reads."""
    if isinstance(value, MetaTensor):
        return {_MT: value.as_tensor(), "meta": _encode(dict(value.meta)),
                "ops": _encode(list(value.applied_operations))}
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise _Unstorable("object array")
        return {_ND: torch.from_numpy(np.ascontiguousarray(value))}
    if isinstance(value, enum.Enum):
        return _encode(value.value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, torch.dtype):
        return {_TD: str(value).removeprefix("torch.")}
    if isinstance(value, (np.dtype, type)) and value is not type:
        try:
            return {_ND_DT: np.dtype(value).str}
        except TypeError:
            raise _Unstorable(f"type {value!r}") from None
    if isinstance(value, dict):
        return {_encode_key(k): _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        seq = [_encode(v) for v in value]
        return tuple(seq) if isinstance(value, tuple) else seq
    if isinstance(value, Path):
        return str(value)
    raise _Unstorable(type(value).__name__)


def _encode_key(key: Any) -> Any:
    if isinstance(key, enum.Enum):  # e.g. MetaKeys: a str subclass the safe unpickler refuses
        key = key.value
    return key if type(key) in (str, int) else str(key)


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if _MT in value:
            return MetaTensor(value[_MT], meta=_decode(value["meta"]), applied_operations=_decode(value["ops"]))
        if _ND in value:
            return value[_ND].numpy()
        if _TD in value:
            return getattr(torch, value[_TD])
        if _ND_DT in value:
            return np.dtype(value[_ND_DT])
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_decode(v) for v in value)
    return value


class MetaPersistentDataset(PersistentDataset):
    """``PersistentDataset`` whose cache files keep MetaTensor metadata and load with ``weights_only``."""

    _warned = False

    def _cachecheck(self, item_transformed: Any) -> Any:
        assert self.cache_dir is not None  # always set by make_dataset
        hashfile = self.cache_dir / f"{self.hash_func(item_transformed).decode('utf-8')}.pt"
        if hashfile.is_file():
            try:
                return _decode(torch.load(hashfile, weights_only=True))
            except Exception as exc:  # noqa: BLE001 - corrupt or foreign file: recompute and replace it
                log.warning("cache file %s unreadable (%s); recomputing", hashfile, type(exc).__name__)
                hashfile.unlink(missing_ok=True)
        out = self._pre_transform(deepcopy(item_transformed))
        try:
            encoded = _encode(out)
        except _Unstorable as exc:
            if not MetaPersistentDataset._warned:
                warnings.warn(f"disk cache: cannot store {exc}; such items are not cached", stacklevel=2)
                MetaPersistentDataset._warned = True
            return out
        with tempfile.TemporaryDirectory(dir=self.cache_dir) as tmp:  # same file system: atomic rename
            tmp_file = Path(tmp) / hashfile.name
            torch.save(encoded, tmp_file)
            os.replace(tmp_file, hashfile)
        return out
