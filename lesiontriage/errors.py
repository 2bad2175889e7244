"""Exception types raised to users.

Every error carries a one-line message naming the input and the reason, so the CLI and the app
can show it verbatim without a traceback.
"""
from __future__ import annotations


class LesionTriageError(Exception):
    """Base class of every error lesiontriage raises on purpose."""


class ImageError(LesionTriageError):
    """An input image cannot be used. ``str(err)`` is '<name>: <reason>'."""

    def __init__(self, source: str, reason: str) -> None:
        self.source = source
        self.reason = reason
        super().__init__(f"{source}: {reason}")


class UnreadableImageError(ImageError):
    """Missing, empty, truncated or not an image at all (text, PDF ...)."""


class UnsupportedImageError(ImageError):
    """A real image in a form we refuse: too small, too large, decompression bomb, odd aspect."""


class ModelError(LesionTriageError):
    """Shipped weights are missing, truncated, tampered with or inconsistent with metadata.json."""


class DataError(LesionTriageError):
    """The shared data root or one of its sets is missing or malformed."""
