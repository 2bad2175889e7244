"""lesiontriage: skin-lesion triage from photos (research and education, not a medical device).

Public API::

    from lesiontriage import TriagePipeline
    pipe = TriagePipeline.from_dir()          # shipped models/
    result = pipe.predict("photo.jpg", aggregate="mean")
"""
from __future__ import annotations

__version__ = "0.1.0"

from lesiontriage.results import INTENDED_USE, Lesion, QualityReport, Tier, TriageResult

__all__ = ["__version__", "INTENDED_USE", "Lesion", "QualityReport", "Tier", "TriageResult", "TriagePipeline"]


def __getattr__(name: str):
    # Lazy import: `import lesiontriage` stays cheap (no torch) for the data tools and the app shell.
    if name == "TriagePipeline":
        from lesiontriage.pipeline import TriagePipeline

        return TriagePipeline
    raise AttributeError(name)
