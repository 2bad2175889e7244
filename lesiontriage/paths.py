"""Where things live: the data root, the shipped models, the run folder.

One place decides, so CLI flags, env vars and defaults agree everywhere.
"""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = REPO_ROOT / "models"
REPORTS_DIR = MODELS_DIR / "reports"
RUNS_DIR = REPO_ROOT / "runs"
DEFAULT_MANIFEST = RUNS_DIR / "data" / "manifest.parquet"


def data_root(explicit: str | os.PathLike | None = None) -> Path:
    """Resolve the read-only data root: argument, else $LESIONTRIAGE_DATA, else ../shared/data."""
    if explicit:
        return Path(explicit).expanduser().resolve()
    env = os.environ.get("LESIONTRIAGE_DATA")
    if env:
        return Path(env).expanduser().resolve()
    return (REPO_ROOT.parent / "shared" / "data").resolve()


def data_available(explicit: str | os.PathLike | None = None) -> bool:
    """True when the data root exists and holds at least one set (tests skip otherwise)."""
    root = data_root(explicit)
    return root.is_dir() and any((root / d / "metadata.csv").is_file() for d in os.listdir(root))


def models_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The models folder: argument, else $LESIONTRIAGE_MODELS, else the shipped ``models/``."""
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get("LESIONTRIAGE_MODELS")
    return Path(env).expanduser() if env else MODELS_DIR
