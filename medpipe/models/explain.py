"""Explanation maps for a classifier's decision: Grad-CAM, Grad-CAM++, occlusion sensitivity.

Pure torch / MONAI, no file I/O. :class:`Explainer` wraps one network (any of
:data:`medpipe.models.classification.CLASSIFIERS`) and returns, for each input, one map per method with
the input's spatial size, scaled to [0, 1] (min-max over that input: a map shows *where* the evidence
is, relative to the rest of that image, not how strong it is in absolute terms). :func:`explain` is the
one-call form.

Methods (``METHODS``):

* ``gradcam`` / ``gradcampp``: ``monai.visualize.GradCAM`` / ``GradCAMpp`` on the layer
  :data:`~medpipe.models.classification.CAM_LAYERS` names, the gradient taken from the chosen class's
  logit (the predicted class by default). The map's resolution is that layer's: a DenseNet121 or
  EfficientNet-B0 downsamples 32 times, so a 32 px image gives a 1x1 feature map and a constant map,
  as does a ResNet with the standard stem on a 28^3 volume (:attr:`Explainer.feature_shape` tells;
  use ``occlusion``, the small ResNet stem or larger inputs there).
* ``occlusion``: ``monai.visualize.OcclusionSensitivity`` (Gaussian occlusion, sliding windows); the
  map is the drop of the chosen class's softmax probability when the neighbourhood of a voxel is
  occluded. Costs one forward pass per window position; the defaults bound that number whatever the
  image size (see :func:`occlusion_settings`): 121 passes for a 28 px image (about 0.1 s for a
  small ResNet, 1.5 s for a full-width ResNet18 on one CPU thread), at most 169 in 2D and 125 in 3D
  (a full-width 3D ResNet18 with the small stem at 28^3 still takes about a minute on one CPU
  thread: lower ``mask_size`` / ``overlap`` or use a GPU there).

Details that differ from calling MONAI naively, and why:

* The network is **deep-copied** (parameters frozen, eval mode): MONAI's ``ModelWithHooks`` registers
  hooks it never removes and switches the target layer's ``inplace`` flag off; the caller's network
  stays untouched. Gradients are taken w.r.t. the input (which is made to require them), so frozen
  networks work too.
* MONAI's default post-processing maps (min, max) to (1, 0), i.e. *inverts* the map; it is replaced
  by a plain min-max scaling to [0, 1].
* ``efficientnet-b0``: ``CAM_LAYERS`` names ``_swish``, but MONAI's EfficientNet calls that one
  module twice (after the stem and after the head convolution), so its backward hook records the
  stem's gradient next to the head's activation (shape mismatch). The copy gets an identity layer
  in front of ``_avg_pooling`` instead: the same tensor (the head's swish output), hooked once.
* ``OcclusionSensitivity(activate=True)`` applies a sigmoid when the *input* has one channel; the
  softmax is passed explicitly. Its deprecated list indexing warns on every window; that warning is
  silenced here.
* ``cnn_rnn`` (:class:`~medpipe.models.classification.SliceSequenceClassifier`): MONAI's CAM classes
  cannot be used as they are: the 2D encoder sees the ``B * D`` slices of a ``(B, C, H, W, D)``
  volume as one batch, so its hooked activations are ``(B * D, c, h, w)``, MONAI then sums the class
  score over that "batch" shape and upsamples the 2D maps to the 3D input size. Here ``encoder.layer4``
  is hooked directly: per-slice activations and gradients -> per-slice Grad-CAM / Grad-CAM++ with
  MONAI's formulas (:func:`hooked_cams`) -> each slice upsampled to ``(H, W)`` -> stacked along ``D``
  and scaled over the whole volume (so slices stay comparable). Gradients reach every slice through
  the bidirectional GRU, not only through the attention weights: a confident (saturated) model can
  show its largest Grad-CAM values on slices with little attention, e.g. the first and last slices,
  where the two GRU directions start; read the map next to the attention weights and the occlusion
  map (the montage shows all three). On CUDA the RNN's backward needs cuDNN off in eval mode, so
  cuDNN is disabled for that pass.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medpipe.models.classification_config import CAM_LAYERS

ExplainMethod = Literal["gradcam", "gradcampp", "occlusion"]
METHODS: tuple[str, ...] = ("gradcam", "gradcampp", "occlusion")

#: networks whose Grad-CAM tensor is the *input* of this module (see the module docstring)
CAM_INPUT_OF: dict[str, str] = {"efficientnet-b0": "_avg_pooling"}

#: default occlusion window per dimensionality: (mask = side / fraction, rounded up to a multiple of q; overlap),
#: so that the window step is exactly mask / 4 in 2D (13 positions per axis at most) and mask / 2 in 3D (5)
OCCLUSION_DEFAULTS: dict[int, tuple[int, int, float]] = {2: (4, 4, 0.75), 3: (3, 2, 0.5)}


def occlusion_settings(spatial_shape: Sequence[int], mask_size: int | Sequence[int] | None = None,
                       overlap: float | None = None) -> tuple[list[int], float, int]:
    """``(mask size per axis, overlap, forward passes)`` for ``OcclusionSensitivity`` on an image.

    Defaults (:data:`OCCLUSION_DEFAULTS`): 2D: a mask of a quarter of each side, rounded up to a
    multiple of 4, overlap 0.75: window step = mask / 4, at most 13 positions per axis (169 passes;
    121 for 28 px). 3D: a third of each side, rounded up to even, overlap 0.5: step = mask / 2, at most
    5 positions per axis (125 passes). The number of passes, hence the time, is bounded whatever the
    image size; its cost per pass is the network's. A given ``mask_size`` is clipped to each side.
    """
    dims = len(spatial_shape)
    fraction, q, default_overlap = OCCLUSION_DEFAULTS.get(dims, (3, 2, 0.5))
    if mask_size is None:
        mask = [q * -(-int(s) // (fraction * q)) for s in spatial_shape]
    elif isinstance(mask_size, int):
        mask = [int(mask_size)] * dims
    else:
        mask = [int(m) for m in mask_size]
    if len(mask) != dims or any(m < 1 for m in mask):
        raise ValueError(f"mask_size must be a positive size per spatial axis ({dims}), got {mask_size}")
    mask = [min(m, int(s)) for m, s in zip(mask, spatial_shape, strict=True)]
    ov = default_overlap if overlap is None else float(overlap)
    if not 0.0 <= ov < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    passes = 1
    for m, s in zip(mask, spatial_shape, strict=True):
        step = max(1, int(m * (1 - ov)))
        passes *= -(-(int(s) - m) // step) + 1
    return mask, ov, passes


def normalize(a: np.ndarray, atol: float = 0.0) -> np.ndarray:
    """Min-max scaling to [0, 1] (float32); non-finite values count as 0.

    A map whose range is below ``atol`` or below 1e-6 of its magnitude is constant (numerical noise)
    and becomes zeros.
    """
    a = np.nan_to_num(np.asarray(a, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if a.size == 0:
        return a.astype(np.float32)
    lo, hi = float(a.min()), float(a.max())
    if hi - lo <= max(atol, 1e-6 * max(abs(lo), abs(hi))):
        return np.zeros(a.shape, dtype=np.float32)
    return ((a - lo) / (hi - lo)).astype(np.float32)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    return logits.float().softmax(1)


def _tensor(x: Any) -> torch.Tensor:
    """A plain tensor (MONAI's MetaTensor carries metadata that hooks and interpolation do not need)."""
    t = x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)
    return t.float()


def hooked_cams(model: nn.Module, layer: str, x: torch.Tensor, class_index: int, *, plus: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw Grad-CAM (or Grad-CAM++) maps at ``layer``, one per *row* of that layer's activations.

    Returns ``(maps (N, *feature_spatial) >= 0, logits)``. ``N`` is the batch the layer saw: 1 for an
    ordinary network and one input, the number of slices for the ``cnn_rnn`` encoder. Channel weights
    are computed per row (per slice), with MONAI's formulas, except that Grad-CAM++'s common factor
    ``exp(score)`` is left out (it cancels in the [0, 1] scaling and overflows for logits above ~88).
    """
    module = dict(model.named_modules()).get(layer)
    if module is None:
        raise ValueError(f"the network has no layer {layer!r}")
    store: dict[str, torch.Tensor] = {}

    def keep(_m: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        store["a"] = output

    handle = module.register_forward_hook(keep)
    cudnn_off = x.is_cuda and any(isinstance(m, nn.RNNBase) for m in model.modules())
    try:
        with torch.enable_grad(), torch.backends.cudnn.flags(enabled=not cudnn_off):
            xg = x.detach().clone().requires_grad_(True)
            logits = model(xg)
            acts = store["a"]
            (grads,) = torch.autograd.grad(logits[:, class_index].sum(), acts)
    finally:
        handle.remove()
    a, g = acts.detach().float(), grads.detach().float()
    spatial = tuple(range(2, a.ndim))
    if plus:
        g2 = g.pow(2)
        denom = 2 * g2 + (a * g.pow(3)).sum(dim=spatial, keepdim=True)
        denom = torch.where(denom != 0.0, denom, torch.ones_like(denom))
        alpha = g2 / (denom + 1e-7)
        weights = (alpha * F.relu(g)).sum(dim=spatial, keepdim=True)
    else:
        weights = g.mean(dim=spatial, keepdim=True)
    maps = F.relu((weights * a).sum(1))
    return maps, logits.detach()


class Explainer:
    """Explanation maps of one classifier, for any number of inputs (build once, call per case).

    Args:
        net: a network of :func:`~medpipe.models.classification.build_classifier` (copied; the
            original is not changed).
        cfg: its configuration (``cfg["name"]`` picks the Grad-CAM layer).
        methods: any of :data:`METHODS`.
        mask_size, overlap, n_batch: occlusion settings (:func:`occlusion_settings`; ``n_batch``
            occluded images per forward pass).

    After a call, :attr:`feature_shape` holds the spatial shape of the Grad-CAM layer's activations
    (per slice for ``cnn_rnn``) and :attr:`seconds` the time spent per method so far.
    """

    def __init__(self, net: nn.Module, cfg: dict[str, Any], methods: Iterable[str] = METHODS, *,
                 mask_size: int | Sequence[int] | None = None, overlap: float | None = None,
                 n_batch: int = 16) -> None:
        self.methods = list(dict.fromkeys(methods))
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"unknown explanation method(s) {unknown}; choose from {', '.join(METHODS)}")
        self.name = str(cfg["name"])
        self.cfg_classes: int | None = cfg.get("num_classes")
        self.mask_size, self.overlap, self.n_batch = mask_size, overlap, int(n_batch)
        self.model = copy.deepcopy(net).eval()
        for prm in self.model.parameters():
            prm.requires_grad_(False)
        self.feature_shape: tuple[int, ...] | None = None
        self.seconds: dict[str, float] = dict.fromkeys(self.methods, 0.0)
        self._cams: dict[str, Any] = {}
        self.layer = self._cam_layer() if {"gradcam", "gradcampp"} & set(self.methods) else None

    def _cam_layer(self) -> str:
        """Set up the Grad-CAM layer (MONAI's CAM objects, except for cnn_rnn); return its name."""
        if self.name not in CAM_LAYERS:
            raise ValueError(f"no Grad-CAM layer is known for network {self.name!r}; use the occlusion method")
        if self.name == "cnn_rnn":
            return CAM_LAYERS[self.name]
        from monai.visualize import GradCAM, GradCAMpp
        from monai.visualize.class_activation_maps import ModelWithHooks

        layer = CAM_LAYERS[self.name]
        if self.name in CAM_INPUT_OF:  # tap the module's input with an identity layer (see module docstring)
            target = CAM_INPUT_OF[self.name]
            parent_name, _, attr = target.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, attr, nn.Sequential(nn.Identity(), getattr(parent, attr)))
            layer = f"{target}.0"
        hooks = ModelWithHooks(self.model, layer, register_forward=True, register_backward=True)
        self._hooks = hooks
        # one hooked model for both (MONAI accepts a ModelWithHooks in place of the network)
        if "gradcam" in self.methods:
            self._cams["gradcam"] = GradCAM(hooks, layer, postprocessing=_identity)  # type: ignore[arg-type]
        if "gradcampp" in self.methods:
            self._cams["gradcampp"] = GradCAMpp(hooks, layer, postprocessing=_identity)  # type: ignore[arg-type]
        return layer

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def __call__(self, x: Any, class_index: int | Sequence[int] | None = None) -> dict[str, np.ndarray]:
        """Maps of ``x`` (``(B, C, *spatial)``, 2D or 3D): ``{method: (B, *spatial) float32 in [0, 1]}``.

        ``class_index``: the class whose evidence is shown: None (each input's predicted class), one
        index for every input, or one per input.
        """
        x = _tensor(x).to(self.device)
        if x.ndim not in (4, 5):
            raise ValueError(f"expected a (batch, channels, *spatial) 2D or 3D input, got shape {tuple(x.shape)}")
        b = x.shape[0]
        if class_index is None:
            with torch.no_grad():
                classes = self.model(x).argmax(1).tolist()
        elif isinstance(class_index, int):
            classes = [int(class_index)] * b
        else:
            classes = [int(c) for c in class_index]
            if len(classes) != b:
                raise ValueError(f"{len(classes)} class indices for a batch of {b}")
        n_classes = int(self.cfg_classes) if self.cfg_classes is not None else None
        if n_classes is not None and any(not 0 <= c < n_classes for c in classes):
            raise ValueError(f"class indices {classes} outside the network's {n_classes} classes")
        out: dict[str, list[np.ndarray]] = {m: [] for m in self.methods}
        for i, c in enumerate(classes):
            xi = x[i:i + 1]
            for m in self.methods:
                t0 = time.perf_counter()
                if m == "occlusion":  # probability differences below 1e-6 are float noise
                    out[m].append(normalize(self._occlusion(xi, c), atol=1e-6))
                else:
                    out[m].append(normalize(self._cam(m, xi, c)))
                self.seconds[m] += time.perf_counter() - t0
        return {m: np.stack(v) for m, v in out.items()}

    def _cam(self, method: str, x: torch.Tensor, c: int) -> np.ndarray:
        """Un-normalised Grad-CAM(++) map of one input, upsampled to its spatial size."""
        if self.name == "cnn_rnn":
            assert self.layer is not None
            maps, _ = hooked_cams(self.model, self.layer, x, c, plus=method == "gradcampp")  # (D, h, w)
            self.feature_shape = tuple(maps.shape[1:])
            h, w = x.shape[2:4]
            up = F.interpolate(maps[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]  # (D, H, W)
            return up.permute(1, 2, 0).cpu().numpy()
        with torch.enable_grad():
            xg = x.detach().clone().requires_grad_(True)
            m = self._cams[method](x=xg, class_idx=c)
        self.feature_shape = tuple(self._hooks.activations[self._hooks.target_layers[0]].shape[2:])
        return m.detach()[0, 0].float().cpu().numpy()

    def _occlusion(self, x: torch.Tensor, c: int) -> np.ndarray:
        """Drop of class ``c``'s probability when each voxel's neighbourhood is occluded."""
        from monai.visualize import OcclusionSensitivity

        mask, overlap, _ = occlusion_settings(x.shape[2:], self.mask_size, self.overlap)
        occ = OcclusionSensitivity(self.model, mask_size=mask, n_batch=self.n_batch, verbose=False,
                                   mode="gaussian", overlap=overlap, activate=_softmax)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Using a non-tuple sequence", category=UserWarning)
            base = _softmax(self.model(x))[0, c]
            occ_map, _ = occ(x.detach())
        return (base - occ_map[0, c]).float().cpu().numpy()


def explain(net: nn.Module, cfg: dict[str, Any], x: Any, methods: Iterable[str] = METHODS,
            class_index: int | Sequence[int] | None = None, *, mask_size: int | Sequence[int] | None = None,
            overlap: float | None = None, n_batch: int = 16) -> dict[str, np.ndarray]:
    """``{method: (B, *spatial) map in [0, 1]}`` for ``x`` (``(B, C, *spatial)``); see :class:`Explainer`."""
    return Explainer(net, cfg, methods, mask_size=mask_size, overlap=overlap, n_batch=n_batch)(x, class_index)


def slice_attention(net: nn.Module, x: Any) -> np.ndarray | None:
    """``cnn_rnn``'s attention weight per slice ``(B, D)`` for ``x``; None for other networks."""
    if not hasattr(net, "last_attention"):
        return None
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            net(_tensor(x).to(next(net.parameters()).device))
    finally:
        net.train(was_training)
    att = getattr(net, "last_attention", None)
    return None if att is None else att.float().cpu().numpy()
