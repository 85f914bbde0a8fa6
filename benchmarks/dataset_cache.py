#!/usr/bin/env python
"""Epoch time of a brain-tumour training loader with no cache, a memory cache and a disk cache.

    python benchmarks/dataset_cache.py [--epochs 5] [--pixdim 2 2 2] [--roi 64 64 32] [--workers 0]

1. Makes the data through the pipeline stages' Python APIs: ``sample`` (12 synthetic studies in
   ``sample_data/brain_tumor``, generated only if absent), ``ingest`` and ``dataset`` (4-channel
   T1/T1c/T2/FLAIR items with SEG label maps, patient-level split) into ``--workdir``.
2. Iterates a ``torch.utils.data.DataLoader`` over the train split with typical transforms
   (LoadImaged, EnsureChannelFirstd, Orientationd RAS, Spacingd, NormalizeIntensityd,
   RandCropByPosNegLabeld, RandFlipd) built by ``medpipe.data.datasets.make_dataset`` with
   ``cache`` = ``none``, ``memory``, ``disk`` (empty cache folder) and ``disk`` again over the cache
   the previous row wrote (what a second run of the same pipeline sees).
3. Prints seconds per epoch: the first epoch (for ``memory`` including the CacheDataset
   construction, which loads everything; for a cold ``disk`` cache including writing it) and the
   mean of the later ("steady") epochs, each with its ratio to no cache (speed-up = none / mode).

Only the part before the first random transform is cached (MONAI's rule), so every mode still
crops and flips at random each epoch. The page cache is warmed by one untimed pass first.
Results also go to ``benchmarks/results/dataset_cache.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results" / "dataset_cache.json"


def transforms(pixdim: list[float], roi: list[int]) -> list[dict[str, Any]]:
    keys = ["image", "label"]
    return [
        {"LoadImaged": {"keys": keys}},
        {"EnsureChannelFirstd": {"keys": keys}},
        {"Orientationd": {"keys": keys, "axcodes": "RAS"}},
        {"Spacingd": {"keys": keys, "pixdim": pixdim, "mode": ["bilinear", "nearest"]}},
        {"NormalizeIntensityd": {"keys": ["image"], "nonzero": True, "channel_wise": True}},
        {"RandCropByPosNegLabeld": {"keys": keys, "label_key": "label", "spatial_size": roi, "pos": 1, "neg": 1,
                                    "num_samples": 2, "image_key": "image", "image_threshold": 0}},
        {"RandFlipd": {"keys": keys, "prob": 0.5, "spatial_axis": 0}},
    ]


def make_datalist(sample_dir: Path, work: Path, cases: int) -> dict[str, Any]:
    from medpipe.runner import RunContext
    from medpipe.stages.dataset import DatasetParams, dataset
    from medpipe.stages.ingest import IngestParams, ingest
    from medpipe.stages.sample import SampleParams, sample

    artifacts: dict[str, Any] = {}
    for i, (fn, params) in enumerate([
        (sample, SampleParams(out=str(sample_dir), cases=cases, seed=0)),
        (ingest, IngestParams()),
        (dataset, DatasetParams()),
    ]):
        stage_dir = work / "stages" / f"{i:02d}_{fn.__name__}"
        stage_dir.mkdir(parents=True, exist_ok=True)
        ctx = RunContext(work, stage_dir, 0, "cpu", False, False, dict(artifacts), logging.getLogger("bench"))
        t0 = time.perf_counter()
        artifacts.update(fn(ctx, params).outputs)  # type: ignore[operator]
        print(f"  {fn.__name__:8s} {time.perf_counter() - t0:6.1f} s", flush=True)
    return json.loads(Path(artifacts["datalist"]).read_text())


def run_epochs(ds: Any, epochs: int, batch: int, workers: int, seed: int, t_build: float) -> list[float]:
    import torch
    from monai.data import DataLoader

    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, generator=g)
    times = []
    for e in range(epochs):
        t0 = time.perf_counter()
        n = 0
        for b in loader:
            n += int(b["image"].shape[0])
        times.append(time.perf_counter() - t0 + (t_build if e == 0 else 0.0))
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1] if __doc__ else None)
    ap.add_argument("--sample", type=Path, default=REPO / "sample_data" / "brain_tumor")
    ap.add_argument("--cases", type=int, default=12)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "medpipe-bench-dataset-cache")
    ap.add_argument("--epochs", type=int, default=6, help="per mode: 1 first + (epochs - 1) steady")
    ap.add_argument("--pixdim", type=float, nargs=3, default=[2.0, 2.0, 2.0])
    ap.add_argument("--roi", type=int, nargs=3, default=[64, 64, 32])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--json", type=Path, default=RESULTS)
    args = ap.parse_args()

    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.ERROR)
    import monai
    import torch

    torch.set_num_threads(args.threads)
    from medpipe.data.datasets import cache_folder, make_dataset

    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"data: {args.cases} synthetic studies in {args.sample}; work dir {args.workdir}")
    doc = make_datalist(args.sample.resolve(), args.workdir.resolve(), args.cases)
    items = doc["train"]
    spec = transforms(args.pixdim, args.roi)
    cache_dir = args.workdir / "cache"
    shutil.rmtree(cache_dir, ignore_errors=True)

    for it in items:  # warm the page cache (untimed)
        for p in [*it["image"], it["label"]]:
            Path(p).read_bytes()

    rows: list[dict[str, Any]] = []
    for mode, label in (("none", "none"), ("memory", "memory"), ("disk", "disk (cold)"), ("disk", "disk (warm)")):
        t0 = time.perf_counter()
        ds = make_dataset(items, spec, mode, cache_dir, workers=1)  # type: ignore[arg-type]
        t_build = time.perf_counter() - t0
        times = run_epochs(ds, args.epochs, args.batch, args.workers, 0, t_build)
        rows.append({"mode": label, "build_s": t_build, "epochs_s": times, "first_s": times[0],
                     "steady_s": statistics.mean(times[1:]) if len(times) > 1 else float("nan")})
        print(f"  {label:12s} epochs: {' '.join(f'{t:.2f}' for t in times)}", flush=True)
    cached_mb = sum(f.stat().st_size for f in cache_folder(cache_dir, spec).glob("*.pt")) / 1e6

    base = rows[0]
    lines = [
        "",
        (f"dataset cache benchmark: {len(items)} training studies x 4 channels, pixdim {args.pixdim}, "
         f"roi {args.roi}, 2 crops/study, batch {args.batch}, DataLoader workers {args.workers}, "
         f"torch threads {args.threads}"),
        (f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
         f"load {os.getloadavg()[0]:.2f}; python {platform.python_version()}, torch {torch.__version__}, "
         f"monai {monai.__version__}"),
        "",
        f"{'cache':12s} {'first epoch s':>14s} {'speed-up':>9s} {'steady s/epoch':>15s} {'speed-up':>9s}",
    ]
    for r in rows:
        lines.append(f"{r['mode']:12s} {r['first_s']:14.2f} {base['first_s'] / r['first_s']:8.2f}x "
                     f"{r['steady_s']:15.2f} {base['steady_s'] / r['steady_s']:8.2f}x")
    lines.append("")
    lines.append("first epoch: memory includes building the CacheDataset (everything loaded and preprocessed once);")
    lines.append("disk (cold) includes writing the cache; disk (warm) is a new dataset over that cache (a re-run).")
    lines.append(f"disk cache: {cached_mb:.1f} MB in {cache_folder(cache_dir, spec)}")
    report = "\n".join(lines)
    print(report)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    gi = args.json.parent / ".gitignore"
    if not gi.exists():
        gi.write_text("*\n")
    args.json.write_text(json.dumps({"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                                     "rows": rows, "cache_mb": cached_mb, "report": report}, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
