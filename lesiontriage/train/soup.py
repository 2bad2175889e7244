"""Greedy weight soup of classifier runs that share their start point (``lesiontriage train soup``).

Why: two fine-tuning runs from the same weights (here: the shipped lesion classifier, fine-tuned on whole photos
with different seeds and sample mixes) stay in one loss basin, so the *average of their weights* is itself a good
network and usually beats each run (Wortsman et al. 2022, "Model soups"). Unlike an ensemble it costs nothing at
inference: the product still runs one network. Greedy soup: sort the candidates by their own validation macro AUC,
start from the best, add each next one only if the averaged weights score higher on validation. The soup is written
as an ordinary run (``runs/<name>/best.pt`` + ``result.json``) so the usual export path ships it, with its recipe in
metadata.json; it is exported only when it beats the best single candidate.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from lesiontriage.paths import RUNS_DIR
from lesiontriage.train.common import load_result, save_checkpoint, save_result

log = logging.getLogger(__name__)

WEIGHT_FILES = ("best.pt", "checkpoint.pt")


@dataclass
class SoupCandidate:
    """One run's weights file, e.g. ``image_classifier_lite2`` (best.pt) or ``image_classifier_lite2:checkpoint.pt``."""

    run: str
    weights_file: str = "best.pt"

    @classmethod
    def parse(cls, spec: str) -> "SoupCandidate":
        run, _, wfile = spec.partition(":")
        wfile = wfile or "best.pt"
        if not run or wfile not in WEIGHT_FILES:
            raise ValueError(f"soup candidate {spec!r}: expected RUN or RUN:best.pt|checkpoint.pt")
        return cls(run, wfile)

    @property
    def label(self) -> str:
        return f"{self.run}:{self.weights_file}"


@dataclass
class SoupRecord:
    """What the greedy soup tried and kept, with every candidate's validation macro AUC."""

    name: str
    candidates: list[dict[str, Any]] = field(default_factory=list)  # label, own val macro AUC, by stratum
    steps: list[dict[str, Any]] = field(default_factory=list)  # label tried, soup AUC with it, kept?
    members: list[str] = field(default_factory=list)
    soup_val_auc: dict[str, float] = field(default_factory=dict)
    best_single: str = ""
    best_single_macro: float = float("nan")
    ensemble_val_auc: dict[str, float] = field(default_factory=dict)  # mean logits of all candidates, for reference
    ship: bool = False
    reason: str = ""


def average_states(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Uniform average of floating tensors (weights and batch-norm running statistics); integer buffers
    (``num_batches_tracked``) are taken from the first state. All states must share keys and shapes."""
    if not states:
        raise ValueError("no states to average")
    keys = list(states[0])
    for s in states[1:]:
        if list(s) != keys:
            raise ValueError("soup candidates have different architectures (state dict keys differ)")
    out: dict[str, torch.Tensor] = {}
    for k in keys:
        first = states[0][k]
        if first.is_floating_point():
            out[k] = torch.stack([s[k].float() for s in states]).mean(0).to(first.dtype)
        else:
            out[k] = first.clone()
    return out


def greedy_soup(states: dict[str, dict[str, torch.Tensor]], own_scores: dict[str, float],
                score: Callable[[dict[str, torch.Tensor]], float]) -> tuple[list[str], float, list[dict[str, Any]]]:
    """Greedy soup: the best candidate first, then each next-best added only if the averaged weights score higher.
    Returns (members, soup score, one step record per candidate tried)."""
    order = sorted(states, key=lambda k: own_scores[k], reverse=True)
    members, best = [order[0]], own_scores[order[0]]
    steps: list[dict[str, Any]] = []
    for label in order[1:]:
        trial = score(average_states([states[m] for m in members + [label]]))
        kept = trial > best
        steps.append({"added": label, "soup_macro_auc": trial, "kept": kept})
        log.info("soup + %s: %.4f (%s)", label, trial, "kept" if kept else "dropped")
        if kept:
            members.append(label)
            best = trial
    return members, best, steps


def make_soup(specs: list[str], name: str, *, command: str, manifest_path: Path | None = None,
              data_root: Path | None = None, runs_dir: Path | None = None,
              uniform: bool = False) -> tuple[SoupRecord, dict[str, Any]]:
    """Score each candidate and the greedy soup on the runs' validation set; write ``runs/<name>/`` (best.pt =
    the soup, result.json = an exportable run summary). Returns the record and the run summary.

    ``uniform``: average every candidate (no greedy selection) and mark it for shipping: for a view that is
    judged on the product's blended score (the whole-image view: ``train hybrid`` weighs it), not on its own AUC."""
    from lesiontriage.train.classifier import ClassifierTrainConfig, ClassifierTrainer, predict_logits, strata_auc

    runs_dir = Path(runs_dir or RUNS_DIR)
    cands = [SoupCandidate.parse(s) for s in specs]
    if len({c.label for c in cands}) < 2:
        raise ValueError("a soup needs at least two different candidates")
    results = {c.label: load_result(runs_dir / c.run) for c in cands}
    first = results[cands[0].label]
    for c in cands[1:]:
        other = results[c.label]["config"]
        if other["network"] != first["config"]["network"] or other["mode"] != first["config"]["mode"]:
            raise ValueError(f"soup candidate {c.run} has a different network or mode than {cands[0].run}")
        if other.get("init_from") != first["config"].get("init_from"):
            raise ValueError(f"soup candidate {c.run} starts from {other.get('init_from')!r}, not "
                             f"{first['config'].get('init_from')!r}: weights only average within one start point")
    states = {}
    for c in cands:
        path = runs_dir / c.run / c.weights_file
        if not path.exists():
            raise FileNotFoundError(f"{path} not found (train {c.run} first)")
        states[c.label] = torch.load(path, map_location="cpu", weights_only=False)["model"]

    cfg = ClassifierTrainConfig(**{**first["config"], "name": name})
    trainer = ClassifierTrainer.__new__(ClassifierTrainer)  # datasets and model only; no training
    ClassifierTrainer.__init__(trainer, cfg, manifest_path=manifest_path, data_root=data_root)
    model = trainer.model
    logits_by: dict[str, np.ndarray] = {}

    def val_auc(state: dict[str, torch.Tensor], label: str | None = None) -> dict[str, float]:
        model.load_state_dict(state)
        logits, _ = predict_logits(model, trainer.val_ds, flip_tta=False, bf16=False)
        if label:
            logits_by[label] = logits
        return strata_auc(trainer.val_rows, logits)

    record = SoupRecord(name=name)
    own = {}
    for label, state in states.items():
        aucs = val_auc(state, label)
        own[label] = aucs["macro"]
        record.candidates.append({"label": label, "macro_auc": aucs["macro"], "val_auc": aucs})
        print(f"{label:45s} val macro {aucs['macro']:.4f} pooled {aucs['pooled']:.4f}", flush=True)
    trials: list[dict[str, float]] = []  # by-stratum AUC of each greedy trial, in order

    def trial_macro(state: dict[str, torch.Tensor]) -> float:
        trials.append(val_auc(state))
        return trials[-1]["macro"]

    if uniform:
        members = sorted(states, key=lambda k: own[k], reverse=True)
        trial_macro(average_states([states[m] for m in members]))
        record.steps = [{"added": "all (uniform soup)", "soup_macro_auc": trials[-1]["macro"], "kept": True}]
    else:
        members, _, record.steps = greedy_soup(states, own, trial_macro)
    for step, aucs in zip(record.steps, trials):
        step["val_auc"] = aucs
        print(f"soup + {step['added']:38s} val macro {step['soup_macro_auc']:.4f} ({'kept' if step['kept'] else 'dropped'})",
              flush=True)
    record.members = members
    kept = [a for st, a in zip(record.steps, trials) if st["kept"]]
    record.soup_val_auc = kept[-1] if kept else next(c["val_auc"] for c in record.candidates if c["label"] == members[0])
    soup = average_states([states[m] for m in members])
    record.best_single = max(own, key=own.get)
    record.best_single_macro = own[record.best_single]
    # For reference (not shipped: it would run every member at inference): mean logits of all candidates.
    record.ensemble_val_auc = strata_auc(trainer.val_rows, np.mean(list(logits_by.values()), axis=0))
    record.ship = len(members) > 1
    record.reason = (f"uniform soup of {len(members)} ({record.soup_val_auc['macro']:.4f}; best single "
                     f"{record.best_single_macro:.4f}): judge it on the product score (`train hybrid`)" if uniform else
                     f"soup of {len(members)} beats the best single run ({record.soup_val_auc['macro']:.4f} > "
                     f"{record.best_single_macro:.4f})" if record.ship else
                     "no candidate improved the best single run when averaged in: nothing to ship")
    run_dir = runs_dir / name
    save_checkpoint(run_dir / "best.pt", model=soup, epoch=-1, val_auc=record.soup_val_auc)
    out = {
        "config": {**asdict(cfg), "name": name},
        "history": [{"epoch": -1, "soup_member": c["label"], "val_auc": c["val_auc"]} for c in record.candidates],
        "best": {"score": record.soup_val_auc["macro"], "epoch": -1, "val_auc": record.soup_val_auc},
        "run_dir": str(run_dir),
        "command": command,
        "manifest_hash": trainer.manifest_hash,
        "soup": asdict(record),
    }
    save_result(run_dir, out)
    return record, out
