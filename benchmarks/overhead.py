"""What medpipe's training loop costs over a plain MONAI loop: the same network, data, transforms, epochs.

For the classifier (real BreastMNIST, ``pipelines/breastmnist.yaml``'s ResNet-18) and the segmenter
(the synthetic brain tumour sample, ``pipelines/brain_tumor.yaml``'s U-Net and transforms), each
repetition trains the model twice from the same seed: once with :func:`medpipe.training.loop.fit`
(:class:`~medpipe.training.loop.SupervisedStep`, medpipe's validation function and checkpoint writer,
exactly what the stages run) and once with a plain loop written below (``plain_classifier`` /
``plain_segmenter``: about 30 lines each, MONAI's losses, metrics and sliding-window inference,
``torch.save`` of the best weights). Both validate at the same cadence and keep the best checkpoint.
The arms alternate (ABBA...) so that load from other processes hits both alike. Printed: per-run
times, the median of each arm, their ratio (target: at most 1.05) and whether both arms produced the
same training losses (they should, to the bit: that shows they did the same work).

``--engine`` adds a third arm for the classifier: MONAI's ``SupervisedTrainer`` with a
``SupervisedEvaluator``, ``ValidationHandler``, ``CheckpointSaver`` and ``LrScheduleHandler`` (needs
PyTorch-Ignite, which medpipe does not depend on: e.g. ``pip install --target DIR pytorch-ignite`` and
``PYTHONPATH=DIR``).

    python benchmarks/overhead.py                      # both tasks, 3 repetitions (about 4 min on 2 cores)
    python benchmarks/overhead.py --task classifier --repeats 5 --engine
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SEED = 0


# -- classifier: BreastMNIST, pipelines/breastmnist.yaml's single model ------------------------------------------------


def classifier_setup(npz: Path, work: Path) -> dict[str, Any]:
    import numpy as np

    from medpipe.data.datalist import class_counts, class_items, load_datalist, model_inputs
    from medpipe.data.datasets import make_dataset
    from medpipe.data.medmnist import import_medmnist
    from medpipe.data.transform_defaults import classifier_eval_transforms, classifier_train_transforms
    from medpipe.models.classification_config import classifier_config

    summary = import_medmnist(npz, work / "breastmnist")
    doc = load_datalist(summary.datalist)
    train, val = class_items(doc, "train", path=summary.datalist), class_items(doc, "val", path=summary.datalist)
    eval_spec = classifier_eval_transforms(2, None)
    return {
        "train_ds": make_dataset(model_inputs(train), classifier_train_transforms(2, None), "memory"),
        "val_ds": make_dataset(model_inputs(val), eval_spec, "memory"), "eval_spec": eval_spec,
        "y_val": np.asarray([int(it["class"]) for it in val]), "counts": class_counts(train, 2), "n_train": len(train),
        "cfg": classifier_config("resnet18", 2, 1, 2, stem="small", widen_factor=0.5),
        "batch_size": 32, "lr": 2e-3, "weight_decay": 1e-4, "val_every": 1,
    }


def _classifier_parts(s: dict[str, Any], epochs: int) -> tuple[Any, ...]:
    """What both arms start from: the seeded network, loader (seeded shuffling and augmentation), loss, optimiser."""
    import torch
    from monai.data import DataLoader

    from medpipe.data.transforms import set_random_state
    from medpipe.models.classification import build_classifier
    from medpipe.training.losses import make_loss

    torch.manual_seed(SEED)
    net = build_classifier(s["cfg"])
    set_random_state(s["train_ds"].transform, SEED)
    loader = DataLoader(s["train_ds"], batch_size=s["batch_size"], shuffle=True, drop_last=True, num_workers=0,
                        generator=torch.Generator().manual_seed(SEED))
    opt = torch.optim.AdamW(net.parameters(), lr=s["lr"], weight_decay=s["weight_decay"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=s["lr"] * 0.01)
    return net, loader, make_loss("class_weights", s["counts"]), opt, sched


def medpipe_classifier(s: dict[str, Any], epochs: int, out: Path) -> tuple[float, list[float]]:
    from medpipe.inference.checkpoint import write_classifier_checkpoint
    from medpipe.training.classification import CLASSIFIER_FLOOR, classifier_batches, classifier_validation
    from medpipe.training.loop import SupervisedStep, fit

    net, loader, loss_fn, opt, sched = _classifier_parts(s, epochs)
    t0 = time.perf_counter()

    def save(epoch: int, v: Any) -> None:
        write_classifier_checkpoint(out / "medpipe.pt", net=net, model=s["cfg"], names={0: "malignant", 1: "benign"},
                                    input_shape=[1, 28, 28], eval_transforms=s["eval_spec"], record={"epoch": epoch})

    run = fit(SupervisedStep(net, loss_fn, opt, classifier_batches("cpu")), loader, epochs=epochs, modules=[net],
              optimizer=opt, scheduler=sched, val_every=s["val_every"], val_columns=("val_loss", "val_auc"),
              validate=classifier_validation(net, s["val_ds"], s["y_val"], batch_size=32),
              floor=CLASSIFIER_FLOOR["auc"], on_best=save)
    return time.perf_counter() - t0, [r["loss"] for r in run.history]


def plain_classifier(s: dict[str, Any], epochs: int, out: Path) -> tuple[float, list[float]]:
    import numpy as np
    import torch
    from monai.data import DataLoader
    from monai.metrics import compute_roc_auc
    from monai.networks.utils import one_hot

    net, loader, loss_fn, opt, sched = _classifier_parts(s, epochs)
    t0 = time.perf_counter()
    val_loader = DataLoader(s["val_ds"], batch_size=32, num_workers=0)
    best, history = -1.0, []
    for epoch in range(1, epochs + 1):
        net.train()
        losses = []
        for batch in loader:
            opt.zero_grad()
            loss = loss_fn(net(batch["image"]), batch["class"].long().view(-1))
            loss.backward()
            opt.step()
            losses.append(loss.item())
        sched.step()
        history.append(float(np.mean(losses)))
        if epoch % s["val_every"] == 0 or epoch == epochs:
            net.eval()
            with torch.no_grad():
                prob = torch.cat([torch.softmax(net(b["image"]), 1) for b in val_loader])
            y = torch.as_tensor(s["y_val"])[:, None]
            auc = float(compute_roc_auc(prob, one_hot(y, 2)))
            if auc > best:
                best = auc
                torch.save(net.state_dict(), out / "plain.pt")
    return time.perf_counter() - t0, history


def engine_classifier(s: dict[str, Any], epochs: int, out: Path) -> tuple[float, list[float]]:
    """MONAI's SupervisedTrainer with its validation, checkpoint and LR-schedule handlers (needs ignite)."""
    import numpy as np
    import torch
    from ignite.engine import Events
    from monai.data import DataLoader
    from monai.engines import SupervisedEvaluator, SupervisedTrainer
    from monai.handlers import ROCAUC, CheckpointSaver, LrScheduleHandler, ValidationHandler, from_engine
    from monai.transforms import Activationsd, AsDiscreted, Compose

    net, loader, loss_fn, opt, sched = _classifier_parts(s, epochs)
    t0 = time.perf_counter()

    def prepare(batch: dict[str, Any], device: Any, non_blocking: bool, **kw: Any) -> tuple[Any, Any]:
        return batch["image"].to(device), batch["class"].long().view(-1).to(device)

    def prepare_val(batch: dict[str, Any], device: Any, non_blocking: bool, **kw: Any) -> tuple[Any, Any]:
        return batch["image"].to(device), batch["class"].long().view(-1, 1).to(device)

    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=DataLoader(s["val_ds"], batch_size=32, num_workers=0),
        network=net, prepare_batch=prepare_val,
        postprocessing=Compose([Activationsd("pred", softmax=True), AsDiscreted("label", to_onehot=2)]),
        key_val_metric={"val_auc": ROCAUC(output_transform=from_engine(["pred", "label"]))},
        val_handlers=[CheckpointSaver(str(out), {"net": net}, save_key_metric=True, key_metric_filename="engine.pt")])
    losses: list[float] = []
    epoch_losses: list[float] = []
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=epochs, train_data_loader=loader, network=net, optimizer=opt,
        loss_function=loss_fn, prepare_batch=prepare,
        train_handlers=[LrScheduleHandler(sched, print_lr=False),
                        ValidationHandler(validator=evaluator, interval=s["val_every"], epoch_level=True)])
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: epoch_losses.append(e.state.output[0]["loss"]))

    def epoch_done(e: Any) -> None:
        losses.append(float(np.mean(epoch_losses)))
        epoch_losses.clear()

    trainer.add_event_handler(Events.EPOCH_COMPLETED, epoch_done)
    trainer.run()
    return time.perf_counter() - t0, losses


# -- segmenter: the synthetic brain tumour sample, pipelines/brain_tumor.yaml's U-Net --------------------------------


def segmenter_setup(work: Path) -> dict[str, Any]:
    import yaml

    from medpipe.data.datalist import load_datalist, split_items
    from medpipe.data.datasets import make_dataset
    from medpipe.data.labels import label_info
    from medpipe.models.segmentation import segmenter_config
    from medpipe.runner import RunContext
    from medpipe.stages.dataset import DatasetParams, dataset
    from medpipe.stages.ingest import IngestParams, ingest
    from medpipe.stages.sample import SampleParams, sample

    spec = yaml.safe_load((REPO / "pipelines" / "brain_tumor.yaml").read_text())
    st = {s["stage"]: s for s in spec["stages"]}
    artifacts: dict[str, Any] = {}
    for i, (fn, params) in enumerate([
        (sample, SampleParams(out=str(REPO / st["sample"]["out"]), cases=st["sample"]["cases"], seed=spec["seed"])),
        (ingest, IngestParams()),
        (dataset, DatasetParams(reference=st["dataset"]["reference"], split=st["dataset"]["split"])),
    ]):
        stage_dir = work / "stages" / f"{i:02d}_{fn.__name__}"
        stage_dir.mkdir(parents=True, exist_ok=True)
        ctx = RunContext(work, stage_dir, 0, "cpu", False, False, dict(artifacts), logging.getLogger("bench"))
        artifacts.update(fn(ctx, params).outputs)  # type: ignore[operator]
    dl = Path(artifacts["datalist"])
    doc = load_datalist(dl)
    t = st["train_segmenter"]
    return {
        "train_ds": make_dataset(split_items(doc, "train", need_labels=True, path=dl), t["train_transforms"], "memory"),
        "val_ds": make_dataset(split_items(doc, "val", need_labels=True, path=dl), t["eval_transforms"], "memory"),
        "eval_spec": t["eval_transforms"], "info": label_info("whole_tumor", None, None),
        "cfg": segmenter_config("unet", 4, 2, channels=t["channels"], strides=t["strides"]),
        "roi": tuple(t["roi_size"]), "batch_size": t["batch_size"], "lr": t["lr"], "val_every": t["val_every"],
        "weight_decay": 1e-5,
    }


def _segmenter_parts(s: dict[str, Any], epochs: int) -> tuple[Any, ...]:
    import torch
    from monai.data import DataLoader

    from medpipe.data.transforms import set_random_state
    from medpipe.models.segmentation import build_from_config
    from medpipe.training.losses import segmenter_loss

    torch.manual_seed(SEED)
    net = build_from_config(s["cfg"])
    set_random_state(s["train_ds"].transform, SEED)
    loader = DataLoader(s["train_ds"], batch_size=s["batch_size"], shuffle=True, num_workers=0,
                        generator=torch.Generator().manual_seed(SEED))
    opt = torch.optim.AdamW(net.parameters(), lr=s["lr"], weight_decay=s["weight_decay"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=s["lr"] * 0.02)
    return net, loader, segmenter_loss(False), opt, sched


def medpipe_segmenter(s: dict[str, Any], epochs: int, out: Path) -> tuple[float, list[float]]:
    from medpipe.inference.checkpoint import write_segmenter_checkpoint
    from medpipe.training.loop import SupervisedStep, fit
    from medpipe.training.segmentation import segmenter_batches, segmenter_validation

    net, loader, loss_fn, opt, sched = _segmenter_parts(s, epochs)
    t0 = time.perf_counter()

    def save(epoch: int, v: Any) -> None:
        write_segmenter_checkpoint(out / "medpipe.pt", net=net, model=s["cfg"], labels=s["info"], channels=[],
                                   roi_size=list(s["roi"]), eval_transforms=s["eval_spec"], sw_batch_size=4,
                                   overlap=0.25, record={"epoch": epoch})

    run = fit(SupervisedStep(net, loss_fn, opt, segmenter_batches(s["info"], "cpu")), loader, epochs=epochs,
              modules=[net], optimizer=opt, scheduler=sched, val_every=s["val_every"], val_columns=("val_dice",),
              validate=segmenter_validation(net, s["val_ds"], s["info"], s["roi"]), on_best=save)
    return time.perf_counter() - t0, [r["loss"] for r in run.history]


def plain_segmenter(s: dict[str, Any], epochs: int, out: Path) -> tuple[float, list[float]]:
    import numpy as np
    import torch
    from monai.data import DataLoader
    from monai.inferers import sliding_window_inference
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    net, loader, loss_fn, opt, sched = _segmenter_parts(s, epochs)
    t0 = time.perf_counter()
    dice = DiceMetric(include_background=False, reduction="mean", ignore_empty=True)
    best, history = -1.0, []
    for epoch in range(1, epochs + 1):
        net.train()
        losses = []
        for batch in loader:
            opt.zero_grad()
            loss = loss_fn(net(batch["image"]), (batch["label"] > 0).long())
            loss.backward()
            opt.step()
            losses.append(loss.item())
        sched.step()
        history.append(float(np.mean(losses)))
        if epoch % s["val_every"] == 0 or epoch == epochs:
            net.eval()
            with torch.no_grad():
                for b in DataLoader(s["val_ds"], batch_size=1, num_workers=0):
                    logits = sliding_window_inference(b["image"], s["roi"], 4, net, overlap=0.25, mode="gaussian")
                    dice(one_hot(logits.argmax(1, keepdim=True), 2), one_hot((b["label"] > 0).long(), 2))
            score = float(dice.aggregate().item())
            dice.reset()
            if score > best:
                best = score
                torch.save(net.state_dict(), out / "plain.pt")
    return time.perf_counter() - t0, history


# -- the comparison -------------------------------------------------------------------------------------------------


def compare(task: str, arms: dict[str, Callable[..., tuple[float, list[float]]]], setup: dict[str, Any], epochs: int,
            repeats: int, out: Path) -> dict[str, Any]:
    names = list(arms)
    times: dict[str, list[float]] = {n: [] for n in names}
    losses: dict[str, list[float]] = {}
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            seconds, hist = arms[n](setup, epochs, out)
            times[n].append(seconds)
            losses[n] = hist
            print(f"  {task} run {r + 1}/{repeats} {n:8s} {seconds:7.2f} s  (loss after epoch 1 {hist[0]:.6f}, "
                  f"last {hist[-1]:.6f})", flush=True)
    med = {n: statistics.median(v) for n, v in times.items()}
    print(f"{task}: {epochs} epochs x {repeats} interleaved repetitions")
    for n in names:
        print(f"  {n:8s} median {med[n]:7.2f} s  min {min(times[n]):7.2f} s  runs " +
              " ".join(f"{t:.2f}" for t in times[n]))
    result: dict[str, Any] = {"epochs": epochs, "repeats": repeats, "times": times, "median": med}
    for n in names[1:]:
        ratio, ratio_min = med[n] / med["plain"], min(times[n]) / min(times["plain"])
        same = losses[n] == losses["plain"]
        verdict = "PASS" if ratio <= 1.05 else "MISS"
        print(f"  {n} / plain: {ratio:.3f}x (medians), {ratio_min:.3f}x (minima) -> {verdict} (target <= 1.05x); "
              f"training losses identical to the plain loop's: {'yes' if same else 'NO'}")
        result[f"{n}_ratio"] = ratio
        result[f"{n}_ratio_min"] = ratio_min
        result[f"{n}_same_losses"] = same
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=["classifier", "segmenter", "both"], default="both")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per arm, interleaved (default 3)")
    ap.add_argument("--classifier-epochs", type=int, default=3)
    ap.add_argument("--segmenter-epochs", type=int, default=20, help="validation every 10 as in the pipeline")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as the pipelines' cpu_threads)")
    ap.add_argument("--npz", type=Path, default=REPO.parent / "shared" / "data" / "breastmnist" / "breastmnist.npz")
    ap.add_argument("--engine", action="store_true", help="add MONAI's SupervisedTrainer (classifier; needs ignite)")
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "overhead.json")
    args = ap.parse_args()

    import monai
    import torch

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(args.threads)
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(f"torch {torch.__version__}, MONAI {monai.__version__}, {args.threads} torch thread(s); load average "
          f"{' '.join(load)} (other processes slow both arms alike; the arms alternate)")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="medpipe-overhead-") as tmp:
        work = Path(tmp)
        if args.task in ("classifier", "both"):
            setup = classifier_setup(args.npz, work)
            arms: dict[str, Any] = {"plain": plain_classifier, "medpipe": medpipe_classifier}
            if args.engine:
                arms["engine"] = engine_classifier
            results["classifier"] = compare("classifier", arms, setup, args.classifier_epochs, args.repeats, work)
        if args.task in ("segmenter", "both"):
            setup = segmenter_setup(work)
            results["segmenter"] = compare("segmenter", {"plain": plain_segmenter, "medpipe": medpipe_segmenter}, setup,
                                           args.segmenter_epochs, args.repeats, work)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    (args.json.parent / ".gitignore").write_text("*\n")
    args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
