"""TriagePipeline: the one public entry point (app, CLI and evaluation all call it).

photo -> decode + guards + quality gate -> detector -> crops -> classifier (temperature-scaled)
-> aggregation -> tier. Per-lesion probabilities are kept in the result so the image score can be
re-aggregated without running a network (``reaggregate``).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lesiontriage.aggregation import aggregate as aggregate_probs
from lesiontriage.box_rescoring import BoxRescorer
from lesiontriage.box_selection import MAX_LESIONS, BoxSelection
from lesiontriage.errors import ImageError, ModelError
from lesiontriage.hybrid import HybridRule, largest_box_fraction
from lesiontriage.imaging import LoadedImage, assess_quality, crop_with_margin, load_image
from lesiontriage.networks.classifier import ClassifierConfig, LesionClassifier, MalignantLogitOnly
from lesiontriage.networks.detector import DetectorConfig, build_detector
from lesiontriage.networks.whole_view import MeanLogitEnsemble, whole_view_members, whole_view_spec
from lesiontriage.paths import models_dir as resolve_models_dir
from lesiontriage.results import Lesion, Tier, TriageResult
from lesiontriage.weights import load_weights, read_metadata

log = logging.getLogger(__name__)

EAGER_WHOLE_VIEW_REASON = "whole-image ensemble kept eager: its frozen copies cost ~3 s at load for ~28 ms per close-up"

TIER_NAMES = ("routine", "refer", "urgent")
# Used only when metadata.json has no validation-derived thresholds (never the case for shipped models).
FALLBACK_THRESHOLDS = {"refer": 0.3, "urgent": 0.7}


@dataclass
class PipelineSettings:
    """Inference knobs, read from metadata.json (``pipeline`` section) with these defaults."""

    decode_max_side: int = 2048  # crops come from this decode; the detector resizes further
    detector_score_threshold: float = 0.5
    max_lesions: int = MAX_LESIONS  # box_selection: the detector's own cap; every lesion of a back photo
    nested_containment: float = 0.0  # box_selection: drop parts of a lesion boxed inside it (0 = off)
    merge_score: float = 0.0  # box_selection: overlapping lobes this confident become their union (0 = off)
    merge_iou: float = 0.0  # box_selection: ... when their IoU exceeds this
    merge_min_area: float = 0.0  # box_selection: ... and their union covers this fraction of the photo
    widefield_score_threshold: float = 0.0  # box_selection: the score cut on a many-lesion photo (0 = off) ...
    widefield_min_lesions: int = 0  # ... one with at least this many detections at detector_score_threshold
    default_aggregate: str = "mean"
    flip_tta: bool = False  # lesion classifier: average logits over identity + h-flip + v-flip (chosen on validation)
    # Flip TTA triples the classifier's cost (~30 ms per crop view on the 2-core CPU): a back photo with 77
    # kept boxes took 7.1 s to classify with it. Above this many crops a photo is classified once per crop
    # (measured 2.3-2.5 s for 77); 24 covers 99% of the close-up test photos, where the validation study chose TTA.
    flip_tta_max_crops: int = 24
    torch_threads: int = 2
    ensemble: bool = False  # average the malignancy of classifier + classifier_2 (when installed)
    whole_image_weight: float = 0.0  # close-ups: weight of the whole-image classifier in the image score (hybrid.py)
    full_frame_weight: float = 0.0  # close-ups: weight of the lesion classifier run on the whole photo (hybrid.py)
    closeup_min_box_fraction: float = 0.15  # largest kept box / image area that makes a photo a close-up
    closeup_ramp_from: float | None = None  # soft gate (hybrid.py): views' weights ramp up from this fraction
    no_lesion_views: bool = False  # no lesion kept: the image score comes from the two whole-photo views (hybrid.py)
    # A photo inside the soft gate's ramp (a clinical close-up, largest box 2-15% of the frame) is scored on its main
    # lesion (the most confident detection) instead of the aggregate over every kept box (hybrid.py).
    closeup_ramp_primary_lesion: bool = False
    # Context around each box of a close-up (largest kept box >= closeup_min_box_fraction of the photo) when its crop
    # is classified, as a fraction of the box side (imaging.crop_window); None, and every photo under the gate, use
    # the classifier's trained crop_margin. Chosen on validation by `train hybrid`: a wider context helped the
    # close-ups (their sets without given boxes were trained on whole photos) and hurt wide-field lesions.
    closeup_crop_margin: float | None = None
    fast_cpu: bool = True  # run the networks through frozen oneDNN copies (networks/fast.py), checked vs eager at load

    @property
    def widefield(self) -> tuple[float, int]:
        """(score cut, minimum confident detections) of box_selection's many-lesion rule."""
        return float(self.widefield_score_threshold), int(self.widefield_min_lesions)

    def tta_for(self, n_crops: int) -> bool:
        """Whether a batch of ``n_crops`` lesion crops gets flip TTA (the same rule in predict and evaluate)."""
        return bool(self.flip_tta) and n_crops <= self.flip_tta_max_crops


def _to_tensor(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float().div_(255.0)


class TriagePipeline:
    """Load once (``from_dir``), then ``predict`` many photos; safe to share between threads."""

    def __init__(self, detector: torch.nn.Module | None, det_cfg: DetectorConfig | None, classifier: LesionClassifier,
                 clf_meta: dict[str, Any], metadata: dict[str, Any], image_classifier: LesionClassifier | None = None,
                 image_clf_meta: dict[str, Any] | None = None, settings: PipelineSettings | None = None,
                 models_dir: Path | None = None) -> None:
        self.detector = detector
        self.det_cfg = det_cfg
        self.classifier = classifier
        self.clf_meta = clf_meta
        self.image_classifier = image_classifier
        self.image_clf_meta = image_clf_meta or {}
        self.metadata = metadata
        self.settings = settings or PipelineSettings()
        self.models_dir = models_dir
        self.second_classifier: LesionClassifier | None = None  # ensemble member (settings.ensemble)
        self.second_clf_meta: dict[str, Any] = {}
        self._gradcam_lock = threading.Lock()
        self.fast_detector: torch.nn.Module | None = None  # set by use_fast_cpu_copies()
        self._fast_classifiers: dict[int, Any] = {}  # id(eager classifier) -> its fast copy
        self.inference_engine: dict[str, dict[str, Any]] = {}  # model name -> which engine runs it and why
        self.box_rescorer: BoxRescorer | None = None  # box confidence (box_rescoring.py), when shipped

    # ---- loading ----------------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | Path | None = None, *, load_image_classifier: bool = True,
                 ensemble: bool | None = None, fast: bool | None = None) -> "TriagePipeline":
        """Load the models (default $LESIONTRIAGE_MODELS, else the shipped ``models/``), verifying sha256.

        ``ensemble``: also load ``classifier_2`` and average the two classifiers' probabilities
        (default: the ``pipeline.ensemble`` setting in metadata.json).
        ``fast``: build the frozen CPU copies (:meth:`use_fast_cpu_copies`, ~3 s at load, ~2x faster
        predictions); default the ``fast_cpu`` setting (on)."""
        models_dir = resolve_models_dir(path)
        meta = read_metadata(models_dir)
        models = meta.get("models", {})
        if "classifier" not in models:
            raise ModelError(f"no model installed yet: {models_dir / 'metadata.json'} lists no classifier")
        settings = PipelineSettings(**{k: v for k, v in meta.get("pipeline", {}).items()
                                       if k in PipelineSettings.__dataclass_fields__})
        if ensemble is not None:
            settings = replace(settings, ensemble=bool(ensemble))
        if settings.ensemble and "classifier_2" not in models:
            raise ModelError(f"ensemble requested but {models_dir / 'metadata.json'} lists no classifier_2")
        torch.set_num_threads(settings.torch_threads)
        classifier = cls._load_classifier(models_dir, models["classifier"])
        detector, det_cfg = None, None
        if "detector" in models:
            det_meta = models["detector"]
            det_cfg = DetectorConfig.from_dict(det_meta["config"])
            detector = build_detector(det_cfg, pretrained=False)
            detector.load_state_dict(load_weights(models_dir / det_meta["file"], det_meta["sha256"]))
            detector.eval()
        image_classifier, image_meta = None, models.get("image_classifier")
        if load_image_classifier and "image_classifier" in models:
            image_classifier, image_meta = cls._load_whole_view(models_dir, meta, settings)
        pipe = cls(detector, det_cfg, classifier, models["classifier"], meta, image_classifier,
                   image_meta, settings, models_dir)
        if settings.ensemble:
            pipe.second_classifier = cls._load_classifier(models_dir, models["classifier_2"])
            pipe.second_clf_meta = models["classifier_2"]
        pipe.box_rescorer = cls.load_box_rescorer(models_dir, models, settings)
        if settings.fast_cpu if fast is None else fast:
            pipe.use_fast_cpu_copies()
        return pipe

    @staticmethod
    def load_box_rescorer(models_dir: Path, models: dict[str, Any], settings: PipelineSettings) -> BoxRescorer | None:
        """The box-confidence model, if shipped and trained for this detector and lobe-merging rule
        (its features describe those boxes; for any other it would mislead, so it is skipped with a warning)."""
        entry = models.get("box_rescorer")
        if not entry or "detector" not in models:
            return None
        merge = [float(settings.merge_score), float(settings.merge_iou), float(settings.merge_min_area)]
        if entry.get("applies_to_detector_sha256") != models["detector"]["sha256"] or \
                [float(v) for v in entry.get("merge_rule", merge)] != merge:
            log.warning("box_rescorer was trained for another detector or merge rule: box confidence off "
                        "(re-run `lesiontriage train box-rescorer`)")
            return None
        return BoxRescorer.load(models_dir / entry["file"], entry["sha256"])

    def use_fast_cpu_copies(self) -> dict[str, dict[str, Any]]:
        """Run detection and classification through frozen oneDNN copies of the same weights
        (:mod:`lesiontriage.networks.fast`): each copy is compared with the eager model on seeded
        probes and used only when it agrees (to ~1e-6 in practice); otherwise the eager model runs
        and :attr:`inference_engine` says why. Grad-CAM always uses the eager classifier (gradients)."""
        from lesiontriage.networks.fast import ENGINE_EAGER, fast_classifier, fast_detectors

        if self.detector is not None:
            dets, engines = fast_detectors({"detector": self.detector}, cache_prefix=False)
            self.fast_detector = dets["detector"] if dets["detector"] is not self.detector else None
            self.inference_engine.update(engines)
        for name, model in (("classifier", self.classifier), ("classifier_2", self.second_classifier),
                            ("image_classifier", self.image_classifier)):
            if isinstance(model, MeanLogitEnsemble):
                # Measured on the 2-core CPU: frozen copies of the two members cost ~3 s at load (model load 4.5-5.4 s
                # against the 5 s target) and save ~28 ms per close-up (67 -> 39 ms), so the pipeline keeps them
                # eager; `evaluate`, which runs thousands of photos per load, freezes them.
                self.inference_engine[name] = {"engine": ENGINE_EAGER, "max_rel_diff": None, "reason": EAGER_WHOLE_VIEW_REASON}
            elif model is not None:
                fast, self.inference_engine[name] = fast_classifier(model)
                if fast is not model:
                    self._fast_classifiers[id(model)] = fast
        return self.inference_engine

    @classmethod
    def _load_whole_view(cls, models_dir: Path, meta: dict[str, Any],
                         settings: PipelineSettings) -> tuple[Any, dict[str, Any]]:
        """The whole-image view (networks/whole_view.py) and the metadata its temperature is read from."""
        models = meta["models"]
        missing = [k for k in whole_view_members(meta) if k not in models]
        if missing:
            raise ModelError(f"the whole-image view asks for {', '.join(missing)}, which {models_dir / 'metadata.json'} "
                             "does not list (re-run `lesiontriage train hybrid`)")
        spec = whole_view_spec(meta)
        members = [cls._load_classifier(models_dir, models[k]) for k in spec.members]
        if not spec.wrapped:
            return members[0], models["image_classifier"]
        ensemble = MeanLogitEnsemble(members, [float(models[k].get("temperature", 1.0)) for k in spec.members],
                                     spec.subtype_weight, spec.input_size, spec.flip_tta)
        return ensemble.eval(), {**models["image_classifier"], "temperature": spec.temperature, "sha256": spec.sha256,
                                 "members": list(spec.members), "subtype_weight": spec.subtype_weight,
                                 "input_size": ensemble.config.input_size, "flip_tta": spec.flip_tta}

    @staticmethod
    def _load_classifier(models_dir: Path, entry: dict[str, Any]) -> LesionClassifier:
        cfg = ClassifierConfig.from_dict(entry["config"])
        model = LesionClassifier(cfg, pretrained=False)
        model.load_state_dict(load_weights(models_dir / entry["file"], entry["sha256"]))
        return model.eval().to(memory_format=torch.channels_last)

    # ---- stages -------------------------------------------------------------------------------------
    @property
    def box_selection(self) -> BoxSelection:
        """The rule (from metadata.json) that turns raw detections into reported lesions."""
        s = self.settings
        return BoxSelection(s.detector_score_threshold, s.max_lesions, s.nested_containment, s.merge_score, s.merge_iou,
                            s.merge_min_area, *s.widefield)

    @property
    def hybrid_rule(self) -> HybridRule:
        """The close-up blend (from metadata.json; the whole-image view is off without a whole-image classifier)."""
        s = self.settings
        weight = s.whole_image_weight if self.image_classifier is not None else 0.0
        return HybridRule(weight, s.closeup_min_box_fraction, s.full_frame_weight, s.closeup_ramp_from, s.no_lesion_views,
                          s.closeup_ramp_primary_lesion)

    @staticmethod
    def result_rule(result: TriageResult) -> HybridRule:
        """The blend that made ``result``'s score (weights 0 when none was applied)."""
        return HybridRule(result.whole_image_weight, full_frame_weight=result.full_frame_weight)

    def detect_raw(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every box the detector emits (its own score floor), best first: for evaluation and studies."""
        if self.detector is None:
            h, w = rgb.shape[:2]
            return np.array([[0, 0, w, h]], dtype=np.float32), np.ones(1, dtype=np.float32)
        detector = self.fast_detector if self.fast_detector is not None else self.detector
        with torch.inference_mode():
            out = detector([_to_tensor(rgb)])[0]
        return out["boxes"].numpy().astype(np.float32), out["scores"].numpy().astype(np.float32)

    def detect(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Boxes [K, 4] (xyxy, pixels of ``rgb``) and scores [K] of the lesions kept by
        :attr:`box_selection` (lobes merged, score cut, nested parts removed, count cap), best first."""
        boxes, scores, _ = self.detect_scored(rgb)
        return boxes, scores

    def detect_scored(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """:meth:`detect` plus each kept box's confidence (:mod:`lesiontriage.box_rescoring`, computed
        over every merged detection of the photo; None without a shipped box rescorer)."""
        boxes, scores = self.detect_raw(rgb)
        if self.detector is None:
            return boxes, scores, None
        size = (rgb.shape[1], rgb.shape[0])
        sel = self.box_selection
        boxes, scores = sel.merge(boxes, scores, size)
        confidence = self.box_rescorer.score(boxes, scores, size) if self.box_rescorer is not None else None
        keep = sel.select(boxes, scores)
        return boxes[keep], scores[keep], None if confidence is None else confidence[keep]

    def lesion_probabilities(self, rgb: np.ndarray, boxes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """p_malignant [N] and sub-type probabilities [N, 8] of the configured lesion classifier(s) (the
        ensemble's mean when ``settings.ensemble``; flip TTA per settings) for the crops of ``boxes``, or for
        the whole frame as one crop when ``boxes`` is None (the close-up blend's full-frame view)."""
        members = [(self.classifier, self.clf_meta)]
        if self.second_classifier is not None:
            members.append((self.second_classifier, self.second_clf_meta))
        outs = []
        for model, meta in members:
            batch = (self._normalise([_to_tensor(rgb)], model.config) if boxes is None
                     else self._crop_batch(rgb, boxes, model.config))
            outs.append(self.classify(batch, model, meta, tta=self.settings.tta_for(len(batch))))
        return np.mean([o[0] for o in outs], axis=0), np.mean([o[1] for o in outs], axis=0)

    def crop_margin(self, box_fraction: float, cfg: ClassifierConfig | None = None) -> float:
        """The context margin of the lesion crops of a photo whose largest kept box covers ``box_fraction`` of it:
        ``settings.closeup_crop_margin`` on a close-up (at or above the close-up gate), else the trained one."""
        chosen = self.settings.closeup_crop_margin
        if chosen is not None and box_fraction >= float(self.settings.closeup_min_box_fraction):
            return float(chosen)
        return float((cfg or self.classifier.config).crop_margin)

    def _crop_batch(self, rgb: np.ndarray, boxes: np.ndarray, cfg: ClassifierConfig, margin: float | None = None) -> torch.Tensor:
        """The normalised crops of ``boxes`` (all the photo's kept boxes: they decide whether it is a close-up);
        ``margin`` overrides :meth:`crop_margin` (validation studies scoring one context for every box)."""
        if margin is None:
            margin = self.crop_margin(largest_box_fraction(boxes, rgb.shape[1], rgb.shape[0]), cfg)
        crops = [crop_with_margin(rgb, b.tolist(), margin=margin, square=True) for b in boxes]
        return self._normalise([_to_tensor(c) for c in crops], cfg)

    @staticmethod
    def _normalise(tensors: Sequence[torch.Tensor], cfg: ClassifierConfig) -> torch.Tensor:
        size = cfg.input_size
        batch = torch.stack([F.interpolate(t[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
                             for t in tensors])
        mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
        std = torch.tensor(cfg.std).view(1, 3, 1, 1)
        return ((batch - mean) / std).contiguous(memory_format=torch.channels_last)

    def classify(self, batch: torch.Tensor, model: LesionClassifier | None = None,
                 meta: dict[str, Any] | None = None, tta: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Temperature-scaled p_malignant [N] and sub-type probabilities [N, 8].

        ``tta``: average the logits over the crop and its horizontal and vertical flips (a lesion has
        no preferred orientation; the study in ``train box-rule`` decides whether it ships)."""
        model = model or self.classifier
        meta = meta or self.clf_meta
        if len(batch) == 0:
            return np.zeros(0, dtype=np.float32), np.zeros((0, len(model.config.subtypes)), dtype=np.float32)
        logit, sub = self.heads(self._fast_classifiers.get(id(model), model), batch, tta)
        t = float(meta.get("temperature", 1.0))
        p = torch.sigmoid(logit.float() / t).numpy()
        q = torch.softmax(sub.float(), dim=-1).numpy()
        return p, q

    @staticmethod
    def heads(model: Any, batch: torch.Tensor, tta: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw malignant logits [N] and sub-type logits [N, C], optionally flip-averaged; ``model`` is a
        ``LesionClassifier`` or its fast copy (both called on a batch return these two)."""
        n = len(batch)
        views = torch.cat([batch, batch.flip(-1), batch.flip(-2)]) if tta else batch
        with torch.inference_mode():
            logit, sub = model(views.contiguous(memory_format=torch.channels_last))
        if tta:
            logit = logit.float().view(3, n).mean(0)
            sub = sub.float().view(3, n, -1).mean(0)
        return logit, sub

    # ---- triage -------------------------------------------------------------------------------------
    def thresholds(self, mode: str, aggregate: str) -> tuple[dict[str, float], str]:
        """Tier thresholds chosen on validation (metadata ``triage``), and where they came from."""
        triage = self.metadata.get("triage", {}).get(mode, {})
        if aggregate in triage.get("thresholds", {}):
            return triage["thresholds"][aggregate], triage.get("chosen_on", "validation")
        return FALLBACK_THRESHOLDS, "fallback defaults (no validation thresholds in metadata.json)"

    def make_tier(self, lesions: list[Lesion], score: float, mode: str, aggregate: str,
                  result: TriageResult | None = None) -> Tier:
        """Tier from the validation thresholds, with a reason naming the lesion that drives it (and the
        whole-image share of the score when the close-up blend made it)."""
        thr, _ = self.thresholds(mode, aggregate)
        retake = "If you can see a lesion, retake the photo closer, in focus and well lit."
        if mode == "two_stage" and not lesions and not (result is not None and result.blended):
            return Tier("routine", f"No lesion found. {retake} Or try the whole-image mode.", None)
        driver = max(range(len(lesions)), key=lambda i: lesions[i].p_malignant) if lesions else None
        main = result.main_lesion if result is not None else None
        if main is not None and 0 <= main < len(lesions):
            driver = main  # the main lesion alone made the lesion term (hybrid.HybridRule.lesion_term)
        name = "urgent" if score >= thr["urgent"] else "refer" if score >= thr["refer"] else "routine"
        what = (f"lesion #{driver + 1} (p_malignant {lesions[driver].p_malignant:.2f}, most like "
                f"{lesions[driver].top_subtype})" if driver is not None else "the whole image")
        if mode == "two_stage" and not lesions:  # scored by the whole-photo views (hybrid.no_lesion_views)
            what = "the whole photo (no lesion box found; if you can see a lesion, retake the photo closer, in focus and well lit)"
        agg = {"mean": "mean", "max": "maximum", "noisy_or": "noisy-OR"}.get(aggregate, aggregate)
        label = f"{agg} score"
        if result is not None and result.blended and result.lesion_score is not None:
            label = self.result_rule(result).describe(agg, result.lesion_score, result.whole_image_score,
                                                      result.full_frame_score, main)
        if name == "urgent":
            reason = f"Urgent: {label} {score:.2f} >= {thr['urgent']:.2f} (high-PPV point); driven by {what}."
        elif name == "refer":
            reason = f"Refer: {label} {score:.2f} >= {thr['refer']:.2f} (95%-sensitivity point); driven by {what}."
        else:
            reason = f"Routine: {label} {score:.2f} < {thr['refer']:.2f} (95%-sensitivity point); highest: {what}."
        return Tier(name, reason, driver)

    def reaggregate(self, result: TriageResult, aggregate: str) -> TriageResult:
        """Same lesions, another aggregation: no network runs (used by the app's selector)."""
        if result.mode == "whole_image":
            return replace(result, aggregate=aggregate)
        if result.main_lesion is not None:  # a close-up scored on its main lesion: no aggregate enters the score
            lesion_score = float(result.lesions[result.main_lesion].p_malignant)
        else:
            lesion_score = float(aggregate_probs([l.p_malignant for l in result.lesions], aggregate))
        score = lesion_score
        if result.blended:
            score = self.result_rule(result).blend(lesion_score, result.whole_image_score, result.full_frame_score)
        out = replace(result, aggregate=aggregate, image_score=score, lesion_score=lesion_score)
        return replace(out, tier=self.make_tier(out.lesions, score, out.mode, aggregate, out))

    # ---- public prediction --------------------------------------------------------------------------
    def load(self, image: Any, name: str | None = None) -> LoadedImage:
        return load_image(image, name=name, max_side=self.settings.decode_max_side)

    def predict(self, image: Any, aggregate: str | None = None, *, whole_image: bool = False,
                name: str | None = None) -> TriageResult:
        """Triage one photo (path, bytes or PIL image). Raises :class:`ImageError` for bad input."""
        aggregate = aggregate or self.settings.default_aggregate
        aggregate_probs([], aggregate)  # validates the name before any work
        timings: dict[str, float] = {}
        t = time.perf_counter()
        img = self.load(image, name=name)
        timings["decode"] = (time.perf_counter() - t) * 1000
        t = time.perf_counter()
        quality = assess_quality(img.rgb, orig_size=(img.orig_width, img.orig_height))
        timings["quality"] = (time.perf_counter() - t) * 1000
        version = self.metadata.get("package_version", "")
        if whole_image:
            if self.image_classifier is None:
                raise ModelError("whole-image mode needs models/image_classifier.safetensors, which is not installed")
            t = time.perf_counter()
            batch = self._normalise([_to_tensor(img.rgb)], self.image_classifier.config)
            p, _ = self.classify(batch, self.image_classifier, self.image_clf_meta)
            timings["classify"] = (time.perf_counter() - t) * 1000
            timings["total"] = sum(timings.values())
            score = float(p[0])
            return TriageResult(img.name, img.orig_width, img.orig_height, [], aggregate, score,
                                self.make_tier([], score, "whole_image", "whole"), quality, timings, "whole_image", version)
        t = time.perf_counter()
        boxes, det_scores, confidence = self.detect_scored(img.rgb)
        timings["detect"] = (time.perf_counter() - t) * 1000
        t = time.perf_counter()
        probs, subs = self.lesion_probabilities(img.rgb, boxes) if len(boxes) else self.classify(torch.zeros(0))
        h, w = img.rgb.shape[:2]
        fraction = largest_box_fraction(boxes, w, h)  # 0 without a kept box; decides margin, lesion term and blend
        margin = self.crop_margin(fraction)  # what the crops used
        timings["classify"] = (time.perf_counter() - t) * 1000
        names = self.classifier.config.subtypes
        lesions = [
            Lesion(index=i, box=[round(float(v) / img.scale, 1) for v in b], detector_score=float(s), p_malignant=float(p),
                   subtypes={n: float(q) for n, q in zip(names, qs)},
                   box_confidence=None if confidence is None else float(confidence[i]), crop_margin=margin)
            for i, (b, s, p, qs) in enumerate(zip(boxes, det_scores, probs, subs))
        ]
        lesion_score, main = self.hybrid_rule.lesion_term(probs, det_scores, aggregate, fraction)
        score, whole_p, frame_p = lesion_score, None, None
        photo_rule = self.hybrid_rule.for_fraction(fraction, bool(len(boxes)))  # this photo's weights (soft gate scales them)
        blended = photo_rule is not None
        rule = photo_rule or self.hybrid_rule
        if blended and rule.whole_image_weight > 0:
            t = time.perf_counter()
            batch = self._normalise([_to_tensor(img.rgb)], self.image_classifier.config)
            whole_p = float(self.classify(batch, self.image_classifier, self.image_clf_meta)[0][0])
            timings["whole_image"] = (time.perf_counter() - t) * 1000
        if blended and rule.full_frame_weight > 0:
            t = time.perf_counter()
            frame_p = float(self.lesion_probabilities(img.rgb)[0][0])
            timings["full_frame"] = (time.perf_counter() - t) * 1000
        if blended:
            score = rule.blend(lesion_score, whole_p, frame_p)
        result = TriageResult(img.name, img.orig_width, img.orig_height, lesions, aggregate, score,
                              Tier("routine", "", None), quality, timings, "two_stage", version,
                              lesion_score=lesion_score, whole_image_score=whole_p,
                              whole_image_weight=rule.whole_image_weight if blended else 0.0,
                              full_frame_score=frame_p, full_frame_weight=rule.full_frame_weight if blended else 0.0,
                              main_lesion=main)
        result.tier = self.make_tier(lesions, score, "two_stage", aggregate, result)
        timings["total"] = sum(v for k, v in timings.items() if k != "total")
        return result

    def predict_batch(self, images: Iterable[Any], aggregate: str | None = None, *, whole_image: bool = False,
                      ) -> list[TriageResult | ImageError]:
        """Predict many; a bad image yields its ImageError in place and the rest still run."""
        out: list[TriageResult | ImageError] = []
        for im in images:
            try:
                out.append(self.predict(im, aggregate, whole_image=whole_image))
            except ImageError as exc:
                out.append(exc)
        return out

    # ---- explanation --------------------------------------------------------------------------------
    def crop(self, image: Any, lesion: Lesion, name: str | None = None) -> np.ndarray:
        """The lesion's crop (box + context margin) as the classifier saw it, RGB uint8."""
        img = image if isinstance(image, LoadedImage) else self.load(image, name=name)
        box = [v * img.scale for v in lesion.box]
        margin = self.classifier.config.crop_margin if lesion.crop_margin is None else lesion.crop_margin
        return crop_with_margin(img.rgb, box, margin=margin, square=True)

    def gradcam(self, image: Any, lesion_index: int, result: TriageResult | None = None, name: str | None = None) -> np.ndarray:
        """Grad-CAM overlay (RGB uint8, classifier input size) of one lesion's malignant logit."""
        from lesiontriage.explain import gradcam_overlay

        img = image if isinstance(image, LoadedImage) else self.load(image, name=name)
        result = result or self.predict(img.rgb, name=name)
        crop = self.crop(img, result.lesions[lesion_index])
        with self._gradcam_lock:
            return gradcam_overlay(self.classifier, crop)
