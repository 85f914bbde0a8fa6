"""Tiny stages registered for the config / runner tests (kinds prefixed ``toy_``)."""

from __future__ import annotations

import json
from typing import Literal

from medpipe.data.transforms import TransformList
from medpipe.errors import StageError
from medpipe.stage import Need, RunContext, StageParams, StageResult, artifact, stage

artifact("toy_numbers", "file", "a JSON list of numbers (toy stages)")

CALLS: list[str] = []


class ToyMakeParams(StageParams):
    n: int = 3
    fail: bool = False


@stage("toy_make", ToyMakeParams, gives=("toy_numbers",))
def toy_make(ctx: RunContext, p: ToyMakeParams) -> StageResult:
    CALLS.append("toy_make")
    if p.fail:
        raise StageError("asked to fail (fail: true)")
    path = ctx.stage_dir / "numbers.json"
    path.write_text(json.dumps(list(range(p.n))))
    return StageResult(outputs={"toy_numbers": str(path)}, metrics={"n": p.n})


class ToyTrainParams(StageParams):
    epochs: int = 2
    roi_size: tuple[int, int, int] = (8, 8, 8)
    model: Literal["unet", "segresnet"] = "unet"
    train_transforms: TransformList = []
    crash: bool = False


@stage("toy_train", ToyTrainParams, needs=(Need("toy_numbers"),))
def toy_train(ctx: RunContext, p: ToyTrainParams) -> StageResult:
    CALLS.append("toy_train")
    if p.crash:
        raise KeyboardInterrupt  # what a kill looks like from inside
    numbers = json.loads(open(ctx.artifacts["toy_numbers"]).read())
    with ctx.progress("toy epochs", p.epochs) as advance:
        for _ in range(p.epochs):
            advance(1)
    import torch

    return StageResult(metrics={"dice": sum(numbers) / 10 + p.epochs / 100, "device": ctx.device,
                                "torch_threads": torch.get_num_threads()})
