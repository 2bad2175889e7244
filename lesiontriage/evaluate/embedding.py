"""2-D map of the classifier's pooled lesion features (seed 000's Figure 5), as data, not a figure.

Why PCA then t-SNE: t-SNE on 1280-d features is slow and noisy; projecting to <= 50 principal
components first keeps the structure and makes the map reproducible and fast on 2 cores (the
usual recipe). UMAP is used instead when the ``umap`` package is installed (it is not a project
dependency). The coordinates go to ``embedding.parquet`` (one row per ground-truth lesion crop)
and a compact copy to ``embedding.json`` so the app can colour it by malignancy or sub-type.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

# columns carried from the lesions table into the map (for colouring and hover)
CARRY: tuple[str, ...] = ("split", "image_id", "path", "lesion_index", "source", "modality", "synthetic", "diagnosis",
                          "malignant", "top_subtype", "p_gt", "ita_category")
MAX_JSON_POINTS = 4000


def embed_2d(features: np.ndarray, seed: int = 0, method: str = "auto") -> tuple[np.ndarray, dict[str, Any]]:
    """(N, 2) coordinates of (N, F) features and a description of how they were made.

    ``method``: 'auto' (UMAP if installed, else PCA -> t-SNE), 'tsne', 'umap' or 'pca'. Fewer than
    5 points: PCA only (t-SNE needs perplexity < N).

    Runs with one BLAS / OpenMP thread: in a process that has run torch, scikit-learn's OpenMP
    t-SNE fights torch's spinning OpenMP threads and was measured ~150x slower (37 s instead of
    0.24 s for 60 points; 50 s instead of 12 s for 2,700)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        return _embed_2d(features, seed, method)


def _embed_2d(features: np.ndarray, seed: int, method: str) -> tuple[np.ndarray, dict[str, Any]]:
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"embed_2d: expected (N, F) features with N > 0, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("embed_2d: features contain NaN / inf; drop those rows first")
    from sklearn.decomposition import PCA

    n = len(x)
    x = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-6)
    n_pc = int(min(50, n, x.shape[1]))
    pcs = PCA(n_components=n_pc, random_state=seed).fit_transform(x) if n_pc >= 2 else np.c_[x[:, :1], np.zeros((n, 1))]
    if method == "auto":
        try:
            import umap  # noqa: F401

            method = "umap"
        except ImportError:
            method = "tsne"
    if method == "pca" or n < 5:
        return pcs[:, :2].copy(), {"method": "pca", "n": n, "n_pcs": n_pc}
    if method == "umap":
        import umap

        reducer = umap.UMAP(n_components=2, random_state=seed, n_neighbors=min(15, n - 1))
        return reducer.fit_transform(pcs), {"method": "pca+umap", "n": n, "n_pcs": n_pc, "n_neighbors": min(15, n - 1)}
    from sklearn.manifold import TSNE

    perplexity = float(min(30.0, max(2.0, (n - 1) / 3.0)))
    coords = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed, learning_rate="auto",
                  n_jobs=1).fit_transform(pcs)
    return coords, {"method": "pca+tsne", "n": n, "n_pcs": n_pc, "perplexity": perplexity}


def embedding_table(lesions: pd.DataFrame, features: np.ndarray, seed: int = 0,
                    method: str = "auto") -> tuple[pd.DataFrame, dict[str, Any]]:
    """Map of the lesions with finite features and a label: identifying columns + ``x``, ``y``."""
    feats = np.asarray(features, dtype=np.float32)
    if len(feats) != len(lesions):
        raise ValueError(f"embedding_table: {len(feats)} feature rows for {len(lesions)} lesions")
    ok = np.isfinite(feats).all(axis=1) if feats.size else np.zeros(len(lesions), bool)
    if "malignant" in lesions.columns:
        ok &= lesions["malignant"].notna().to_numpy()
    if ok.sum() == 0:
        return pd.DataFrame(), {"status": "not available: no lesion features"}
    coords, info = embed_2d(feats[ok], seed=seed, method=method)
    table = lesions.loc[ok, [c for c in CARRY if c in lesions.columns]].reset_index(drop=True).copy()
    table["x"] = coords[:, 0].astype(np.float32)
    table["y"] = coords[:, 1].astype(np.float32)
    table["subtype"] = table["diagnosis"] if "diagnosis" in table.columns else table.get("top_subtype")
    info.update({"features": "classifier pooled features (model.features) of the ground-truth crops", "seed": seed,
                 "colour_by": ["malignant", "subtype (= diagnosis)", "top_subtype (predicted)", "split", "modality"]})
    return table, info


def embedding_json(table: pd.DataFrame, max_points: int = MAX_JSON_POINTS, seed: int = 0) -> dict[str, Any]:
    """Column lists {x, y, malignant, subtype, ...} (rounded; subsampled beyond ``max_points``)."""
    if table.empty:
        return {}
    t = table.sample(max_points, random_state=seed) if len(table) > max_points else table
    out: dict[str, Any] = {"x": [round(float(v), 3) for v in t["x"]], "y": [round(float(v), 3) for v in t["y"]]}
    for col in ("malignant", "subtype", "top_subtype", "split", "modality", "image_id"):
        if col in t.columns:
            out[col] = [None if pd.isna(v) else (int(v) if col == "malignant" else str(v)) for v in t[col]]
    out["n"] = int(len(t))
    out["subsampled_from"] = int(len(table))
    return out
