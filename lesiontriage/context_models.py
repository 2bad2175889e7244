"""Optional context models used at prediction time: clinical covariates and management suggestion.

Both are small logistic models fitted by ``lesiontriage research`` on top of the frozen lesion
classifier and shipped in ``models/`` (safetensors, sha256-checked like every weight file). They
are optional: when their files are absent the app simply does not offer them.

* :class:`CombinedClinicalModel` turns each lesion's image probability plus the user's answers
  (age, sex, body region, itch / grew / hurt / changed / bleed / elevated) into a combined
  probability; the image score and tier are recomputed and the result says it used them.
* :class:`ManagementModel` suggests EXCISION / CLINICAL FOLLOW-UP / NO FURTHER EXAMINATION for a
  dermoscopy image (optionally with the clinical photo of the same lesion), as on derm7pt. It is a
  research output, never a clinical decision.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from lesiontriage.aggregation import aggregate as aggregate_probs
from lesiontriage.results import TriageResult
from lesiontriage.weights import load_weights, read_metadata

COVARIATE_NOTE = "clinical covariates used: combined image + clinical model (logistic layer fitted on validation)"
MANAGEMENT_NOTE = "Research output from a model fitted on derm7pt (expert-annotated dermoscopy); not a clinical decision."


class _OptionalModel:
    """Shared loading: ``metadata.json`` entry ``KEY`` + its sha256-checked weights, or None if not shipped."""

    KEY = ""

    @classmethod
    def from_dir(cls, models_dir: Path):
        entry = read_metadata(models_dir).get("models", {}).get(cls.KEY)
        if entry is None or not (Path(models_dir) / entry["file"]).exists():
            return None
        return cls(entry, load_weights(Path(models_dir) / entry["file"], entry["sha256"]))


class CombinedClinicalModel(_OptionalModel):
    """p_image (per lesion) + answers -> combined p (per lesion)."""

    KEY = "clinical_combined"

    def __init__(self, entry: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
        from lesiontriage.research.covariates import CovariateEncoder

        self.entry = entry
        self.encoder = CovariateEncoder.from_dict(entry["encoder"])
        self.coef = state["clinical_coef"].double().numpy()
        self.intercept = float(state["clinical_intercept"][0])
        self.stack_coef = state["stack_coef"].double().numpy()
        self.stack_intercept = float(state["stack_intercept"][0])

    def clinical_logit(self, answers: Mapping[str, Any]) -> float:
        from lesiontriage.research.covariates import form_to_frame

        frame = form_to_frame(answers, self.encoder.columns)
        return float(self.encoder.transform(frame)[0] @ self.coef + self.intercept)

    def combine(self, p_image: np.ndarray, answers: Mapping[str, Any]) -> np.ndarray:
        p = np.clip(np.asarray(p_image, dtype=float), 1e-6, 1 - 1e-6)
        z = self.stack_coef[0] * np.log(p / (1 - p)) + self.stack_coef[1] * self.clinical_logit(answers) + self.stack_intercept
        return 1.0 / (1.0 + np.exp(-z))

    def apply(self, result: TriageResult, answers: Mapping[str, Any], pipeline) -> TriageResult:
        """A new result whose lesion probabilities, image score and tier use the answers.

        The image score is the aggregate of the combined lesion probabilities, without the close-up
        blend (lesiontriage.hybrid): the combined model was fitted on lesion probabilities, and the
        blend's weight was chosen for image-only scores."""
        from lesiontriage.research.covariates import any_answer

        if not any_answer(answers) or not result.lesions or result.mode != "two_stage":
            return result
        new_p = self.combine(np.array([l.p_malignant for l in result.lesions]), answers)
        lesions = [replace(l, p_malignant=float(p)) for l, p in zip(result.lesions, new_p)]
        score = float(aggregate_probs([l.p_malignant for l in lesions], result.aggregate))
        tier = pipeline.make_tier(lesions, score, result.mode, result.aggregate)
        given = ", ".join(f"{k}={v}" for k, v in answers.items() if v not in (None, "", "unknown"))
        return replace(result, lesions=lesions, image_score=score, tier=tier, lesion_score=score,
                       whole_image_score=None, whole_image_weight=0.0,
                       full_frame_score=None, full_frame_weight=0.0, main_lesion=None,
                       notes=[*result.notes, f"{COVARIATE_NOTE} ({given})"])


@dataclass
class ManagementSuggestion:
    suggestion: str
    probabilities: dict[str, float]
    variant: str  # "pair" (dermoscopy + clinical photo) | "dermoscopy_only"
    note: str = MANAGEMENT_NOTE


class ManagementModel(_OptionalModel):
    """Whole dermoscopy (+ clinical) image -> frozen classifier outputs -> multinomial logistic regression."""

    KEY = "management"

    def __init__(self, entry: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
        self.entry = entry
        self.state = {k: v.double().numpy() for k, v in state.items()}
        self.classes = list(entry["classes"])

    @staticmethod
    def _image_outputs(pipeline, image: Any) -> tuple[float, np.ndarray, np.ndarray]:
        """Raw logit, sub-type probabilities and pooled features of the whole image (as in training)."""
        from lesiontriage.pipeline import _to_tensor

        img = pipeline.load(image)
        model = pipeline.classifier
        logit, sub, f = model.outputs(pipeline._normalise([_to_tensor(img.rgb)], model.config))
        return float(logit[0]), sub[0].double().numpy(), f[0].double().numpy()

    def suggest(self, pipeline, dermoscopy: Any, clinical: Any | None = None,
                answers: Mapping[str, Any] | None = None) -> ManagementSuggestion:
        from lesiontriage.research.covariates import CovariateEncoder, form_to_frame

        variant = "pair" if clinical is not None else "dermoscopy_only"
        s = {k.split(".", 1)[1]: v for k, v in self.state.items() if k.startswith(variant + ".")}
        info = self.entry["variants"][variant]
        logit, sub, emb = self._image_outputs(pipeline, dermoscopy)
        parts = [np.array([logit]), sub, (emb - s["pca_derm_mean"]) @ s["pca_derm_components"].T]
        if clinical is not None:
            c_logit, c_sub, c_emb = self._image_outputs(pipeline, clinical)
            parts += [np.array([c_logit]), c_sub, (c_emb - s["pca_clin_mean"]) @ s["pca_clin_components"].T]
        enc = CovariateEncoder.from_dict(info["meta_encoder"])
        parts.append(enc.transform(form_to_frame(dict(answers or {}), enc.columns))[0])
        x = (np.concatenate(parts) - s["x_mean"]) / s["x_std"]
        z = s["coef"] @ x + s["intercept"]
        p = np.exp(z - z.max())
        p /= p.sum()
        probs = {c: float(v) for c, v in zip(self.classes, p)}
        return ManagementSuggestion(self.classes[int(np.argmax(p))], probs, variant)
