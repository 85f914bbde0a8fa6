"""Quality of generated images: Fréchet distance of features (FID) and the generated-class rate.

The features come from a classifier trained on the real images (``train_gan`` trains a small one,
:func:`medpipe.training.gan.train_feature_extractor`): :func:`features_and_classes` takes the input
of its last linear layer. :func:`fid` is ``monai.metrics.FIDMetric`` on two feature sets;
:func:`matched_fid` averages it over random subsets of the generated set as large as a reference
sample (FID is biased upwards for small samples, so compare numbers of equal sample sizes);
:func:`class_rate` is the fraction of images the classifier calls a given class.
"""

from __future__ import annotations

from typing import Any


def features_and_classes(net: Any, x: Any, device: str, batch: int = 256, layer: str = "fc") -> tuple[Any, Any]:
    """The input of ``net``'s last linear layer ``layer`` (float64, CPU) and its predicted classes, for ``x``."""
    import torch

    captured: list[Any] = []
    handle = net.get_submodule(layer).register_forward_hook(lambda _m, inp, _out: captured.append(inp[0].detach()))
    preds = []
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch):
                preds.append(net(x[i:i + batch].to(device)).argmax(1).cpu())
    finally:
        handle.remove()
    return torch.cat(captured).double().cpu(), torch.cat(preds)


def fid(a: Any, b: Any) -> float | None:
    """Fréchet distance between two feature sets (``monai.metrics.FIDMetric``); None with fewer than 2 in either."""
    if len(a) < 2 or len(b) < 2:
        return None
    import contextlib
    import io
    import warnings

    from monai.metrics import FIDMetric

    # MONAI prints when it regularises a singular product; SciPy warns about near-singular covariances
    # (fewer samples than features) and about MONAI's use of a deprecated argument
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(FIDMetric()(a, b))


def matched_fid(real: Any, fake: Any, n: int, seed: int, repeats: int = 10) -> float | None:
    """Mean FID of ``real`` vs ``repeats`` random subsets of ``fake`` of size ``n`` (the sample size of a reference)."""
    import numpy as np
    import torch

    if n < 2 or len(fake) < n:
        return None
    gen = torch.Generator().manual_seed(seed)
    values = [fid(real, fake[torch.randperm(len(fake), generator=gen)[:n]]) for _ in range(repeats)]
    return float(np.mean([v for v in values if v is not None]))


def class_rate(predicted: Any, target: int) -> float | None:
    """The fraction of ``predicted`` classes equal to ``target`` (None when empty)."""
    if len(predicted) == 0:
        return None
    return float((predicted == target).float().mean())
