"""``lesiontriage research``: run the seed-extra studies and write their reports.

Writes ``models/reports/{clinical,management,ensemble,ablation_threshold,ablation_clahe,
ablation_imbalance}.json`` (each with a provenance block: command, manifest hash, model sha256,
seed), merges the headline numbers into ``models/reports/summary.json`` and, for the app, ships
``models/clinical_combined.safetensors`` and ``models/management.safetensors`` with their entries
in ``models/metadata.json``.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from lesiontriage import paths
from lesiontriage.data.manifest import load_manifest, manifest_hash
from lesiontriage.paths import RUNS_DIR
from lesiontriage.research.features import FeatureSet, FrozenClassifier, extract_features, manifest_rows
from lesiontriage.results import INTENDED_USE
from lesiontriage.weights import read_metadata, save_weights, write_metadata

log = logging.getLogger(__name__)

STUDIES = ("clinical", "management", "ensemble", "ablations")
CLASSIFIED_SOURCES = ["ham10000", "pad_ufes20_subset", "derm7pt", "sd198_tumour_subset"]
#: Held-out test splits of the ablation and ensemble tables: name -> (sources, split, modality).
TEST_SPLITS: dict[str, tuple[list[str], str, str | None]] = {
    "isic2018_test": (["isic2018_task3_test"], "test", None),
    "derm7pt_clinical_test": (["derm7pt"], "test", "clinical"),
    "derm7pt_dermoscopy_test": (["derm7pt"], "test", "dermoscopy"),
    "pad_ufes20_test": (["pad_ufes20_subset"], "test", None),
    "sd198_test": (["sd198_tumour_subset"], "test", None),
}


@dataclass
class ResearchSettings:
    models_dir: Path = field(default_factory=paths.models_dir)
    out_dir: Path | None = None
    data_root: Path | None = None
    manifest: Path | None = None
    ensemble_runs: tuple[str, ...] = ("classifier_lite2",)
    n_boot: int = 1000
    seed: int = 0
    command: str = "lesiontriage research"
    export_models: bool = True

    @property
    def reports(self) -> Path:
        return self.out_dir or (self.models_dir / "reports")


class Context:
    """Manifest, shipped classifier and a feature cache shared by the studies of one run."""

    def __init__(self, s: ResearchSettings) -> None:
        self.s = s
        self.manifest = load_manifest(s.manifest)
        self.manifest_digest = manifest_hash(self.manifest)
        self.meta = read_metadata(s.models_dir)
        self.clf = FrozenClassifier.shipped(s.models_dir)
        self.temperature = self.clf.temperature

    def features(self, rows: pd.DataFrame, clf: FrozenClassifier | None = None, clahe: bool = False,
                 desc: str | None = None) -> FeatureSet:
        fs = extract_features(rows, clf or self.clf, clahe=clahe, data_root=self.s.data_root, desc=desc)
        return fs.subset(fs.ok)

    def rows(self, sources: list[str], splits: list[str], modality: str | None = None) -> pd.DataFrame:
        return manifest_rows(self.manifest, sources, splits, modality)

    def val_rows(self) -> pd.DataFrame:
        return self.rows(CLASSIFIED_SOURCES, ["val"])

    def test_rows(self) -> dict[str, pd.DataFrame]:
        return {n: self.rows(src, [sp], mod) for n, (src, sp, mod) in TEST_SPLITS.items()}

    def provenance(self, extra_models: dict[str, str] | None = None) -> dict[str, Any]:
        from lesiontriage import __version__

        shas = {"classifier": self.meta["models"]["classifier"]["sha256"]}
        shas.update(extra_models or {})
        return {"command": self.s.command, "manifest_hash": self.manifest_digest, "model_sha256": shas,
                "seed": self.s.seed, "n_boot": self.s.n_boot, "package_version": __version__,
                "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "data_root": str(paths.data_root(self.s.data_root)), "intended_use": INTENDED_USE}


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if not np.isfinite(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def write_report(directory: Path, name: str, body: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(_jsonable(body), indent=1, allow_nan=False))
    tmp.replace(path)
    return path


def merge_summary(directory: Path, entries: dict[str, Any], provenance: dict[str, Any]) -> Path:
    """Add/replace headline keys in summary.json, keeping everything ``lesiontriage evaluate`` wrote."""
    path = directory / "summary.json"
    summary = json.loads(path.read_text()) if path.exists() else {"provenance": provenance, "intended_use": INTENDED_USE}
    summary.setdefault("research_provenance", {})
    for key, value in entries.items():
        summary[key] = value
        summary["research_provenance"][key] = provenance["command"]
    return write_report(directory, "summary", summary)


def _metric(d: dict[str, Any], split: str) -> dict[str, Any]:
    """A summary entry: value, ci_low, ci_high, n, split."""
    return {"value": d.get("value"), "ci_low": d.get("ci_low"), "ci_high": d.get("ci_high"), "n": d.get("n"),
            "split": split, **({"n_pos": d["n_pos"]} if "n_pos" in d else {})}


# ---- studies ----------------------------------------------------------------------------------------

def run_clinical(ctx: Context) -> tuple[dict[str, Any], dict[str, Any]]:
    from lesiontriage.research import clinical as C

    cfg = C.ClinicalStudyConfig(n_boot=ctx.s.n_boot, seed=ctx.s.seed)
    sets: dict[str, Any] = {}
    # HAM10000: train -> (val, cross-fitted); PAD-UFES-20 and derm7pt: train -> val -> test.
    ham_train = ctx.rows(["ham10000"], ["train"])
    ham_val = ctx.features(ctx.rows(["ham10000"], ["val"]))
    sets["ham10000"] = C.study_set("ham10000", _rows_only(ham_train), ham_val, None, ctx.temperature, cfg,
                                   "HAM10000 validation (cross-fitted combined layer)")
    pad = {sp: ctx.features(ctx.rows(["pad_ufes20_subset"], [sp])) for sp in ("val", "test")}
    sets["pad_ufes20_subset"] = C.study_set("pad_ufes20_subset", _rows_only(ctx.rows(["pad_ufes20_subset"], ["train"])),
                                            pad["val"], pad["test"], ctx.temperature, cfg, "PAD-UFES-20 test")
    for modality in ("clinical", "dermoscopy"):
        d = {sp: ctx.features(ctx.rows(["derm7pt"], [sp], modality)) for sp in ("val", "test")}
        sets[f"derm7pt_{modality}"] = C.study_set("derm7pt", _rows_only(ctx.rows(["derm7pt"], ["train"], modality)),
                                                  d["val"], d["test"], ctx.temperature, cfg, f"derm7pt {modality} test")
    # The shipped combined model (app questions), pooled over the three sets.
    tr = pd.concat([ham_train, ctx.rows(["pad_ufes20_subset"], ["train"]), ctx.rows(["derm7pt"], ["train"], "clinical")])
    va = pd.concat([ham_val.rows, pad["val"].rows, ctx.rows(["derm7pt"], ["val"])])
    te = pd.concat([pad["test"].rows, ctx.rows(["derm7pt"], ["test"])])
    pooled = C.fit_pooled(_rows_only(tr.reset_index(drop=True)), ctx.features(va.reset_index(drop=True)),
                          ctx.features(te.reset_index(drop=True)), ctx.temperature, cfg)
    report = {"provenance": ctx.provenance(), "design": C.__doc__.strip().split("\n\n")[1], "sets": sets,
              "shipped_combined_model": pooled.metrics}
    if ctx.s.export_models:
        report["shipped_combined_model"]["file"] = str(export_clinical_model(ctx, pooled).name)
    pad_test = sets["pad_ufes20_subset"]
    summary = {
        "image_only_auc": _metric(pad_test["image_only"]["auc"], "PAD-UFES-20 test"),
        "clinical_only_auc": _metric(pad_test["clinical_only"]["auc"], "PAD-UFES-20 test"),
        "combined_auc": _metric(pad_test["combined"]["auc"], "PAD-UFES-20 test"),
    }
    return report, summary


def _rows_only(rows: pd.DataFrame) -> FeatureSet:
    """A FeatureSet carrying only rows (the clinical-only fit needs no image features)."""
    n = len(rows)
    return FeatureSet(rows.reset_index(drop=True), np.zeros(n, np.float32), np.zeros((n, 0), np.float32),
                      np.zeros((n, 0), np.float32), np.ones(n, bool))


def export_clinical_model(ctx: Context, model) -> Path:
    state = {"clinical_coef": torch.tensor(model.clinical.coef, dtype=torch.float32),
             "clinical_intercept": torch.tensor([model.clinical.intercept], dtype=torch.float32),
             "stack_coef": torch.tensor(model.stack_coef, dtype=torch.float32),
             "stack_intercept": torch.tensor([model.stack_intercept], dtype=torch.float32)}
    path = ctx.s.models_dir / "clinical_combined.safetensors"
    sha = save_weights(state, path)
    meta = read_metadata(ctx.s.models_dir)
    meta["models"]["clinical_combined"] = {
        "file": path.name, "sha256": sha, "kind": "clinical_combined",
        "architecture": "logistic regression on the app's covariates (clinical logit), then a logistic layer on "
                        "[lesion image logit / T, clinical logit]",
        "encoder": model.clinical.encoder.to_dict(), "feature_names": model.clinical.encoder.feature_names,
        "applies_to_classifier_sha256": ctx.meta["models"]["classifier"]["sha256"],
        "test_metrics": {k: model.metrics[k] for k in ("image_only", "clinical_only", "combined")},
        "training": {"command": ctx.s.command, "manifest_hash": ctx.manifest_digest,
                     "fitted_on": model.metrics["clinical_model"]["fitted_on"],
                     "stack_fitted_on": model.metrics["stack"]["fitted_on"]},
        "exported": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    meta.setdefault("changelog", []).append({"date": dt.date.today().isoformat(), "model": "clinical_combined",
                                             "change": f"fitted ({ctx.s.command})"})
    write_metadata(ctx.s.models_dir, meta)
    return path


def run_management(ctx: Context) -> tuple[dict[str, Any], dict[str, Any]]:
    from lesiontriage.research import management as M

    rows = ctx.rows(["derm7pt"], ["train", "val", "test"])
    derm = ctx.features(rows[rows["modality"] == "dermoscopy"].reset_index(drop=True))
    clin = ctx.features(rows[rows["modality"] == "clinical"].reset_index(drop=True))
    table = M.build_cases(derm, clin)
    pair = M.run_management_study(table, M.ManagementConfig(n_boot=ctx.s.n_boot, seed=ctx.s.seed))
    derm_only = M.run_management_study(table, M.ManagementConfig(n_boot=ctx.s.n_boot, seed=ctx.s.seed, use_clinical=False))
    report = {"provenance": ctx.provenance(), "design": M.__doc__.strip().split("\n\n")[1],
              "dermoscopy_and_clinical": pair, "dermoscopy_only": derm_only}
    if ctx.s.export_models:
        report["shipped"] = export_management_models(ctx, {"pair": pair, "dermoscopy_only": derm_only})
    summary = {
        "management_accuracy": _metric(pair["multitask"]["accuracy"], "derm7pt test (multi-task)"),
        "management_auroc": _metric(pair["direct"]["auroc_macro_ovr"], "derm7pt test (direct)"),
        "management_accuracy_inferred": _metric(pair["inferred"]["accuracy"], "derm7pt test (inferred via p(MGMT|DIAG))"),
    }
    return report, summary


def export_management_models(ctx: Context, studies: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Ship the direct model of both variants (PCA + standardiser + multinomial LR as tensors)."""
    from lesiontriage.research.management import MANAGEMENT

    state: dict[str, torch.Tensor] = {}
    variants: dict[str, Any] = {}
    for name, study in studies.items():
        enc, lr = study["_models"]["encoder"], study["_models"]["direct"]
        t = lambda a: torch.tensor(np.asarray(a), dtype=torch.float32)
        state[f"{name}.pca_derm_mean"], state[f"{name}.pca_derm_components"] = t(enc.pca_derm.mean_), t(enc.pca_derm.components_)
        if enc.cfg.use_clinical:
            state[f"{name}.pca_clin_mean"], state[f"{name}.pca_clin_components"] = t(enc.pca_clin.mean_), t(enc.pca_clin.components_)
        state[f"{name}.x_mean"], state[f"{name}.x_std"] = t(enc.mean), t(enc.std)
        coef = np.zeros((len(MANAGEMENT), lr.coef_.shape[1]))
        inter = np.full(len(MANAGEMENT), -1e4)
        coef[lr.classes_], inter[lr.classes_] = lr.coef_, lr.intercept_
        state[f"{name}.coef"], state[f"{name}.intercept"] = t(coef), t(inter)
        variants[name] = {"use_clinical": enc.cfg.use_clinical, "meta_encoder": enc.meta.to_dict(),
                          "test_accuracy": study["direct"]["accuracy"]["value"],
                          "test_auroc": study["direct"]["auroc_macro_ovr"]["value"]}
    path = ctx.s.models_dir / "management.safetensors"
    sha = save_weights(state, path)
    meta = read_metadata(ctx.s.models_dir)
    meta["models"]["management"] = {
        "file": path.name, "sha256": sha, "kind": "management_direct", "classes": list(MANAGEMENT),
        "architecture": "frozen lesion classifier on the whole dermoscopy (+ clinical) image -> logit, sub-type "
                        "probabilities, PCA of pooled features + sex/region/elevation -> multinomial logistic regression",
        "variants": variants, "applies_to_classifier_sha256": ctx.meta["models"]["classifier"]["sha256"],
        "training": {"command": ctx.s.command, "manifest_hash": ctx.manifest_digest,
                     "data": "derm7pt official train (fit) / valid (C) / test (reported)"},
        "intended_use": "research output only: never a clinical management decision",
        "exported": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    meta.setdefault("changelog", []).append({"date": dt.date.today().isoformat(), "model": "management",
                                             "change": f"fitted ({ctx.s.command})"})
    write_metadata(ctx.s.models_dir, meta)
    return {"file": path.name, "sha256": sha, "variants": list(variants)}


def run_ablations(ctx: Context) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    from lesiontriage.research import ablations as A

    cfg = A.AblationConfig(n_boot=ctx.s.n_boot, seed=ctx.s.seed)
    val, tests = ctx.features(ctx.val_rows()), {n: ctx.features(r) for n, r in ctx.test_rows().items()}
    val_c = ctx.features(val.rows, clahe=True)
    tests_c = {n: ctx.features(fs.rows, clahe=True) for n, fs in tests.items()}
    prov = ctx.provenance()
    reports = {
        "ablation_threshold": {"provenance": prov, **A.threshold_tuning(val, tests, ctx.temperature)},
        "ablation_clahe": {"provenance": prov, **A.clahe_ablation(val, val_c, tests, tests_c, ctx.temperature, cfg)},
        "ablation_imbalance": {"provenance": prov, **A.imbalance_ablation(val, tests, cfg)},
    }
    for r in reports.values():
        r["design"] = A.__doc__.strip().split("\n\n")[1]
    isic = reports["ablation_clahe"]["inference_only"]["isic2018_test"]
    summary = {"clahe_auc": {**_metric(isic["with"], "ISIC 2018 test, ground-truth crops, CLAHE at inference"),
                             "without_clahe": isic["without"]["value"]}}
    return reports, summary


def run_ensemble(ctx: Context) -> tuple[dict[str, Any], dict[str, Any]] | None:
    from lesiontriage.research import ensemble as E

    members = [ctx.clf]
    for run in ctx.s.ensemble_runs:
        run_dir = RUNS_DIR / run
        if (run_dir / "best.pt").exists() and (run_dir / "result.json").exists():
            members.append(FrozenClassifier.from_run(run_dir))
        elif "classifier_2" in ctx.meta["models"]:  # a fresh clone: the shipped ensemble member
            members.append(FrozenClassifier.shipped(ctx.s.models_dir, "classifier_2"))
        else:
            log.warning("ensemble member %s not found (no %s/best.pt)", run, run_dir)
    if len(members) < 2:
        return None
    val_rows, test_rows = ctx.val_rows(), ctx.test_rows()
    val = {m.name: extract_features(val_rows, m, data_root=ctx.s.data_root) for m in members}
    ok = np.logical_and.reduce([v.ok for v in val.values()])
    val = {k: v.subset(ok) for k, v in val.items()}
    tests = {}
    for name, rows in test_rows.items():
        f = {m.name: extract_features(rows, m, data_root=ctx.s.data_root) for m in members}
        ok = np.logical_and.reduce([v.ok for v in f.values()])
        tests[name] = {k: v.subset(ok) for k, v in f.items()}
    body = E.run_ensemble_study(members, val, tests, E.EnsembleConfig(n_boot=ctx.s.n_boot, seed=ctx.s.seed))
    report = {"provenance": ctx.provenance({m.name: m.tag for m in members[1:]}), **body}
    isic = body["splits"]["isic2018_test"]
    summary = {"ensemble_auc": {**_metric(isic["ensemble"], "ISIC 2018 test, ground-truth crops"),
                                "single_auc": isic[members[0].name]["value"], "members": body["members"]}}
    return report, summary


def run_research(settings: ResearchSettings, studies: Sequence[str] = STUDIES) -> dict[str, Path]:
    ctx = Context(settings)
    written: dict[str, Path] = {}
    summary: dict[str, Any] = {}
    for study in studies:
        if study == "clinical":
            report, s = run_clinical(ctx)
            written["clinical"] = write_report(settings.reports, "clinical", report)
        elif study == "management":
            report, s = run_management(ctx)
            written["management"] = write_report(settings.reports, "management", report)
        elif study == "ablations":
            reports, s = run_ablations(ctx)
            for name, body in reports.items():
                written[name] = write_report(settings.reports, name, body)
        elif study == "ensemble":
            out = run_ensemble(ctx)
            if out is None:
                log.warning("ensemble: fewer than two members available; skipped")
                continue
            report, s = out
            written["ensemble"] = write_report(settings.reports, "ensemble", report)
        else:
            raise ValueError(f"unknown study {study!r}; choose from {', '.join(STUDIES)}")
        summary.update(s)
    if summary:
        written["summary"] = merge_summary(settings.reports, summary, ctx.provenance())
    return written
