"""CPU-fast copies of the shipped networks, used by ``TriagePipeline`` (default) and ``lesiontriage evaluate``.

Why: the detector resizes every photo to a 896 px long side; in eager PyTorch detection + the flip-TTA
classification of a 12-megapixel photo cost ~1.1 s on a 2-core AVX2 CPU, over the 1 s target, and the
evaluation runs two detectors (one-class and C=2) on most images. Three things cut that without
changing what is computed (measured on that CPU: detect 630 -> 280 ms, 6 crops x 3 views 455 -> 305 ms):

1. The detector backbone + FPN and the RPN head, and the classifiers' ``outputs``, are plain
   convolution stacks: a frozen TorchScript copy run through oneDNN (batch-norm folded into the
   convolutions, activations fused) computes the same function ~2x faster from the same weights.
2. The C=2 detector was fine-tuned from the one-class detector with its stem and first two
   EfficientNet stages frozen, so both compute the identical stride-4 features (~20% of a pass);
   when the weights are equal the two detectors share one cached prefix, reused only for an input
   equal to the one it was computed from (evaluation only: the pipeline builds uncached prefixes).
3. Everything with control flow (resize, anchors, proposal selection, NMS, the box head, box
   post-processing) stays torchvision's own ``FasterRCNN.forward`` on an unchanged copy, and the
   timm backbone's own ``forward`` runs the remaining stages.

So only float rounding differs from the product. Each fast copy is checked against the eager model
on seeded probe inputs when it is built and is not used (the eager model is) when it differs by more
than ``tolerance`` or TorchScript is unavailable; the returned info says which engine runs and why,
and the evaluation report records it.
"""
from __future__ import annotations

import copy
import logging
import warnings
from collections import OrderedDict
from typing import Any, Mapping

import torch
from torch import nn

from lesiontriage.networks.whole_view import MeanLogitEnsemble

log = logging.getLogger(__name__)

ENGINE_FAST_DET = "torchscript-onednn (backbone + FPN + RPN head), torchvision FasterRCNN logic unchanged"
ENGINE_FAST_CLS = "torchscript-onednn (the classifier's outputs(): features + heads)"
ENGINE_EAGER = "eager PyTorch (as the product)"
TOLERANCE = 1e-3  # largest accepted |fast - eager| / max|eager| per output on the probes (seen: ~2e-6)


def freeze_for_cpu(module: nn.Module, *example: Any) -> torch.jit.ScriptModule:
    """Trace ``module`` on ``example``, freeze its weights and let TorchScript fold batch-norm and
    pick oneDNN kernels. Tracing suits these modules: convolution stacks whose only shape-dependent
    step (the FPN's upsampling) is recorded as a size op, which the non-square probes verify."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TorchScript deprecation / tracer warnings: the probes check the result
        traced = torch.jit.trace(module.eval(), example, strict=False, check_trace=False)
        return torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))


def _probe(shape: tuple[int, int], seed: int = 0, n: int = 1) -> torch.Tensor:
    """A seeded batch in the networks' normalised input range [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, 3, *shape), generator=g) * 2.0 - 1.0


def _max_rel_diff(ref: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor]) -> float:
    """Largest |ref - got| over the outputs, each relative to that output's largest |ref|."""
    worst = 0.0
    for k, v in ref.items():
        v = v.float()
        scale = float(v.abs().max()) if v.numel() else 0.0
        worst = max(worst, float((v - got[k].float()).abs().max()) / (scale or 1.0) if v.numel() else 0.0)
    return worst


def _as_dict(tensors: Any) -> dict[str, torch.Tensor]:
    """Flatten an OrderedDict / tuple / nested lists of tensors into {index: tensor} for comparison."""
    if isinstance(tensors, Mapping):
        return {str(k): v for k, v in tensors.items()}
    flat: list[torch.Tensor] = []
    stack = list(tensors)
    while stack:
        t = stack.pop(0)
        if isinstance(t, (list, tuple)):
            stack[:0] = list(t)
        else:
            flat.append(t)
    return {str(i): t for i, t in enumerate(flat)}


def _eager(reason: str, diff: float | None = None) -> dict[str, Any]:
    log.warning("fast copy not used (%s); using the eager model", reason)
    return {"engine": ENGINE_EAGER, "max_rel_diff": diff, "reason": reason, "shared_prefix": False}


# =====================================================================================================
# detectors
# =====================================================================================================

class PrefixCache:
    """The frozen stem + first two stages of a detector backbone, remembering its last input and
    output so a second detector with identical frozen layers reuses them for the same image."""

    def __init__(self, scripted: torch.jit.ScriptModule, cache: bool = True) -> None:
        self.scripted = scripted
        self.cache = cache
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # (input, output), replaced as one object
        self.hits = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        last = self._last  # one read: another thread may replace it, never half of it
        if last is not None and last[0].shape == x.shape and torch.equal(last[0], x):
            self.hits += 1
            return last[1]
        h = self.scripted(x)
        if self.cache:
            self._last = (x.clone(), h)
        return h


class FrozenBackbone(nn.Module):
    """Drop-in for the detector's ``backbone``: same input, same ``OrderedDict`` of FPN levels."""

    def __init__(self, prefix: PrefixCache, tail: torch.jit.ScriptModule, out_channels: int) -> None:
        super().__init__()
        self.prefix = prefix
        self.tail = tail
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        return OrderedDict(self.tail(self.prefix(x)))


class FrozenRPNHead(nn.Module):
    """Drop-in for ``rpn.head``: list of FPN levels -> (objectness list, box-delta list)."""

    def __init__(self, scripted: torch.jit.ScriptModule) -> None:
        super().__init__()
        self.scripted = scripted

    def forward(self, features: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        logits, deltas = self.scripted(features)
        return list(logits), list(deltas)


def _prefix(backbone: nn.Module) -> nn.Sequential:
    """Stem + first two EfficientNet stages: the stride-4 feature the FPN's finest level reads."""
    body = backbone.body
    return nn.Sequential(body.conv_stem, body.bn1, body.blocks[0], body.blocks[1])


def _tail(backbone: nn.Module) -> nn.Module:
    """A copy of the backbone whose prefix layers are identities, so timm's own forward runs the
    remaining stages and the FPN on the prefix output (the probe checks the result)."""
    tail = copy.deepcopy(backbone)
    tail.body.conv_stem, tail.body.bn1 = nn.Identity(), nn.Identity()
    tail.body.blocks[0], tail.body.blocks[1] = nn.Identity(), nn.Identity()
    return tail.eval()


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa)


def _long_side(det: nn.Module) -> int:
    return int(det.transform.max_size)


PROBE_SIDE = 320  # trace / check inputs: small keeps the build ~1 s; the check runs another, non-square size


def _probe_side(det: nn.Module) -> int:
    """Side of the square trace probe: the detector's own long side, capped at :data:`PROBE_SIDE`
    (the traced graph is shape-generic; :func:`_check` proves it on a different, non-square shape)."""
    return min(_long_side(det), PROBE_SIDE)


def _build_fast(det: nn.Module, prefix: PrefixCache) -> nn.Module:
    """A copy of ``det`` with the frozen backbone (shared ``prefix`` + its own tail) and RPN head."""
    side = _probe_side(det)
    x = _probe((side, side))
    with torch.no_grad():
        h = _prefix(det.backbone)(x)
        feats = list(det.backbone(x).values())
    backbone = FrozenBackbone(prefix, freeze_for_cpu(_tail(det.backbone), h), det.backbone.out_channels)
    head = FrozenRPNHead(freeze_for_cpu(det.rpn.head, feats))
    fast = copy.deepcopy(det)
    fast.backbone, fast.rpn.head = backbone, head
    return fast.eval()


def _check(eager: Mapping[str, nn.Module], fast: Mapping[str, nn.Module]) -> dict[str, float]:
    """Max relative difference per detector on a non-square probe (a trace that baked in its
    example's shape fails here), running the detectors in turn as the evaluation does so a shared
    prefix is reused from the cache exactly as in use."""
    out: dict[str, float] = {}
    for key, det in eager.items():
        side = _probe_side(det)
        x = _probe((side * 3 // 4, side), seed=1)
        with torch.inference_mode():
            ref = det.backbone(x)
            got = fast[key].backbone(x)
            heads_ref, heads_got = det.rpn.head(list(ref.values())), fast[key].rpn.head(list(ref.values()))
        out[key] = max(_max_rel_diff(ref, got), _max_rel_diff(_as_dict(heads_ref), _as_dict(heads_got)))
    return out


def fast_detectors(dets: Mapping[str, nn.Module], tolerance: float = TOLERANCE, cache_prefix: bool = True
                   ) -> tuple[dict[str, nn.Module], dict[str, dict[str, Any]]]:
    """Fast copies of torchvision Faster R-CNN ``dets`` ({name: detector}); detectors whose prefix
    weights equal the first one's share its :class:`PrefixCache` (``cache_prefix=False``: the prefix
    keeps no copy of its last input, as the pipeline wants for one detector). Returns
    ({name: detector to use}, {name: {engine, max_rel_diff, reason, shared_prefix}}); a detector whose
    copy cannot be built or differs is returned as given (eager)."""
    dets = {k: d.eval() for k, d in dets.items()}
    try:
        first = next(iter(dets.values()))
        side = _probe_side(first)
        shared = PrefixCache(freeze_for_cpu(_prefix(first.backbone), _probe((side, side))), cache=cache_prefix)
        prefixes = {k: shared if _same_weights(_prefix(d.backbone), _prefix(first.backbone)) and _long_side(d) == _long_side(first)
                    else PrefixCache(freeze_for_cpu(_prefix(d.backbone), _probe((_probe_side(d),) * 2)), cache=cache_prefix)
                    for k, d in dets.items()}
        fast = {k: _build_fast(d, prefixes[k]) for k, d in dets.items()}
        diffs = _check(dets, fast)
    except Exception as exc:  # TorchScript missing / unsupported op: the eager models still give the right answer
        reason = f"{exc.__class__.__name__}: {exc}"
        return dict(dets), {k: _eager(reason) for k in dets}
    n_sharing = sum(1 for p in prefixes.values() if p is shared)
    chosen, info = {}, {}
    for k, d in dets.items():
        if diffs[k] <= tolerance:
            chosen[k] = fast[k]
            info[k] = {"engine": ENGINE_FAST_DET, "max_rel_diff": diffs[k], "reason": "",
                       "shared_prefix": prefixes[k] is shared and n_sharing > 1}
        else:
            chosen[k] = d
            info[k] = _eager(f"probe difference {diffs[k]:.2g} > {tolerance:.2g}", diffs[k])
    return chosen, info


# =====================================================================================================
# classifiers
# =====================================================================================================

class _Outputs(nn.Module):
    """What tracing records: the malignant logit [N], the sub-type *logits* [N, C] (flip TTA averages
    logits) and the pooled features [N, F], from one pass through the trunk (dropout is off in eval)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f = self.model.features(x)
        return self.model.malignant_head(f).squeeze(-1).float(), self.model.subtype_head(f).float(), f.float()


class FastClassifier:
    """What inference uses of a ``LesionClassifier`` (``config``, ``outputs`` and calling it for the
    two heads' logits), run by a frozen trace of the model's own ``outputs``. Grad-CAM needs
    gradients and keeps using the eager model."""

    def __init__(self, model: nn.Module, scripted: torch.jit.ScriptModule) -> None:
        self.model = model
        self.config = model.config
        self.scripted = scripted

    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            logit, sub, f = self.scripted(x.contiguous(memory_format=torch.channels_last))
        return logit, sub, f

    def outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """As ``LesionClassifier.outputs``: logit, sub-type probabilities, pooled features."""
        logit, sub, f = self._run(x)
        return logit, torch.softmax(sub, dim=-1), f

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(malignant logit [N], sub-type logits [N, C]), as ``LesionClassifier.forward`` in eval."""
        logit, sub, _ = self._run(x)
        return logit, sub


def fast_classifier(model: nn.Module, tolerance: float = TOLERANCE, size: int | None = None) -> tuple[Any, dict[str, Any]]:
    """A :class:`FastClassifier` for ``model``, or ``model`` itself when the frozen copy is unavailable
    or its (logit, sub-type, feature) outputs differ from eager by more than ``tolerance`` on a
    seeded probe batch of another size than the traced one. ``size``: the photo side it will run at (default:
    its trained size; the whole-image view may run its members at another). Returns (classifier, info)."""
    if isinstance(model, MeanLogitEnsemble):  # the whole-image ensemble: one frozen copy per member
        parts = [fast_classifier(m, tolerance, model.config.input_size) for m in model.members]
        info = {"engine": "members", "members": [i for _, i in parts],
                "reason": "; ".join(i["reason"] for _, i in parts if i["reason"])}
        return MeanLogitEnsemble([m for m, _ in parts], model.temperatures, **model.tta), info
    model = model.eval()
    size = int(size or model.config.input_size)
    trace_in = _probe((size, size)).contiguous(memory_format=torch.channels_last)
    check_in = _probe((size, size), seed=1, n=3).contiguous(memory_format=torch.channels_last)
    try:
        fast = FastClassifier(model, freeze_for_cpu(_Outputs(model), trace_in))
        with torch.inference_mode():
            diff = _max_rel_diff(_as_dict(model.outputs(check_in)), _as_dict(fast.outputs(check_in)))
    except Exception as exc:  # TorchScript missing / unsupported op: the eager model still gives the right answer
        return model, _eager(f"{exc.__class__.__name__}: {exc}")
    if not diff <= tolerance:
        return model, _eager(f"probe difference {diff:.2g} > {tolerance:.2g}", diff)
    return fast, {"engine": ENGINE_FAST_CLS, "max_rel_diff": diff, "reason": ""}
