"""Research reports (``models/reports/*.json``) -> the tables and figures the dashboard shows.

Kept out of the page so they are testable and reusable from a notebook; every function takes the
report's parsed JSON and returns a DataFrame (or a plotly figure) and never raises on a missing
key: an absent number shows as an empty cell.
"""
from __future__ import annotations

from typing import Any

import pandas as pd


def fmt_ci(m: dict[str, Any] | None, digits: int = 3) -> str:
    """'0.873 (0.84-0.90)' from a metric object; '' when missing."""
    if not isinstance(m, dict) or m.get("value") is None:
        return ""
    s = f"{m['value']:.{digits}f}"
    if m.get("ci_low") is not None and m.get("ci_high") is not None:
        s += f" ({m['ci_low']:.{digits}f}-{m['ci_high']:.{digits}f})"
    return s


def _delta(p: dict[str, Any] | None) -> str:
    if not isinstance(p, dict) or p.get("delta") is None:
        return ""
    return f"{p['delta']:+.3f} (p={p['p_value']:.3f})"


def clinical_table(report: dict[str, Any]) -> pd.DataFrame:
    rows = []
    blocks = dict(report.get("sets", {}))
    if isinstance(report.get("shipped_combined_model"), dict):
        blocks["shipped (app questions, pooled)"] = report["shipped_combined_model"]
    for name, b in blocks.items():
        rows.append({
            "set": name, "held-out split": b.get("split", ""), "n": b.get("n"), "malignant": b.get("n_malignant"),
            "image-only AUC": fmt_ci((b.get("image_only") or {}).get("auc")),
            "clinical-only AUC": fmt_ci((b.get("clinical_only") or {}).get("auc")),
            "combined AUC": fmt_ci((b.get("combined") or {}).get("auc")),
            "combined AP": fmt_ci((b.get("combined") or {}).get("ap")),
            "combined - image (paired)": _delta((b.get("paired") or {}).get("combined_vs_image_only")),
        })
    return pd.DataFrame(rows)


STRATEGIES = {"direct": "direct", "inferred": "inferred via p(MGMT | DIAG)", "multitask": "multi-task head"}


def management_table(report: dict[str, Any]) -> pd.DataFrame:
    rows = []
    for inputs, label in (("dermoscopy_and_clinical", "dermoscopy + clinical"), ("dermoscopy_only", "dermoscopy only")):
        block = report.get(inputs) or {}
        for key, name in STRATEGIES.items():
            m = block.get(key)
            if not isinstance(m, dict):
                continue
            sens = m.get("sensitivity") or {}
            rows.append({"inputs": label, "strategy": name, "accuracy": fmt_ci(m.get("accuracy")),
                         "AUROC (macro OvR)": fmt_ci(m.get("auroc_macro_ovr")),
                         **{f"sens. {k}": None if v is None else round(v, 3) for k, v in sens.items()},
                         "over-excision": m.get("over_excision"), "under-excision": m.get("under_excision"),
                         "n": m.get("n")})
        if block.get("majority_baseline_accuracy") is not None:
            rows.append({"inputs": label, "strategy": "majority class (baseline)",
                         "accuracy": f"{block['majority_baseline_accuracy']:.3f}"})
    return pd.DataFrame(rows)


def confusion_figure(m: dict[str, Any], title: str):
    import plotly.graph_objects as go

    cm = m["confusion_matrix"]
    labels = cm["labels"]
    z = cm["rows_truth_cols_pred"]
    fig = go.Figure(go.Heatmap(z=z, x=labels, y=labels, colorscale="Blues", text=z, texttemplate="%{text}",
                               showscale=False))
    fig.update_layout(title=title, xaxis_title="predicted", yaxis_title="truth", height=320,
                      margin=dict(l=10, r=10, t=40, b=10), yaxis_autorange="reversed")
    return fig


def ensemble_table(report: dict[str, Any]) -> pd.DataFrame:
    members = report.get("members", [])
    rows = []
    for split, b in (report.get("splits") or {}).items():
        row = {"split": split}
        for name in members:
            row[f"{name} AUC"] = fmt_ci(b.get(name))
        row["ensemble AUC"] = fmt_ci(b.get("ensemble"))
        if members:
            row[f"ensemble - {members[0]} (paired)"] = _delta(b.get(f"ensemble_vs_{members[0]}"))
        row["n"] = (b.get("ensemble") or {}).get("n")
        rows.append(row)
    return pd.DataFrame(rows)


def latency_table(report: dict[str, Any]) -> pd.DataFrame:
    rows = []
    for name, entries in (report.get("latency_per_member") or {}).items():
        for e in entries:
            rows.append({"member": name, "crops per pass": e.get("batch"), "median ms": round(e.get("median_ms", 0), 1),
                         "p95 ms": round(e.get("p95_ms", 0), 1)})
    return pd.DataFrame(rows)


def threshold_table(report: dict[str, Any]) -> pd.DataFrame:
    rows = []
    blocks = {"validation": report.get("validation") or {}, **(report.get("test") or {})}
    for split, b in blocks.items():
        for arm in ("default", "tuned"):
            r = b.get(arm) or {}
            rows.append({"split": split, "threshold": f"{arm} ({r.get('threshold', float('nan')):.3f})",
                         "sensitivity": r.get("sensitivity"), "specificity": r.get("specificity"),
                         "balanced accuracy": r.get("balanced_accuracy")})
    return pd.DataFrame(rows).round(3)


def clahe_table(report: dict[str, Any]) -> pd.DataFrame:
    rows = []
    for variant, label in (("inference_only", "shipped classifier, CLAHE at inference"),
                           ("probe", "logistic probe on frozen features")):
        for split, b in (report.get(variant) or {}).items():
            rows.append({"variant": label, "split": split, "AUC with CLAHE": fmt_ci(b.get("with")),
                         "AUC without": fmt_ci(b.get("without")), "difference (paired)": _delta(b.get("paired"))})
    return pd.DataFrame(rows)


def imbalance_table(report: dict[str, Any]) -> pd.DataFrame:
    rows = []
    for arm, splits in (report.get("arms") or {}).items():
        for split, b in splits.items():
            r = b.get("at_0.5") or {}
            rows.append({"strategy": arm.replace("_", " "), "split": split, "AUC": fmt_ci(b.get("auc")),
                         "sensitivity @0.5": r.get("sensitivity"), "specificity @0.5": r.get("specificity")})
    return pd.DataFrame(rows).round(3)
