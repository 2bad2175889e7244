"""Shipped weights: safetensors files verified by sha256, and ``models/metadata.json``.

Weights are stored as safetensors (no pickle: loading a file cannot run code) and every load
checks the file against the sha256 recorded in metadata.json, so a truncated checkout, a Git LFS
pointer or a tampered file is refused with a message naming the file and the expected hash
instead of producing silently wrong predictions.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from lesiontriage.errors import ModelError

log = logging.getLogger(__name__)

METADATA_FILE = "metadata.json"
_FP16_MAX = 65504.0
_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same folder + rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; shipped files are world-readable
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def save_weights(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike, *, fp16: bool = False,
                 metadata: Mapping[str, str] | None = None) -> str:
    """Save a state dict as safetensors and return the file's sha256 (record it in metadata.json).

    ``fp16=True`` stores floating-point tensors as float16 (half the size; :func:`load_weights`
    returns float32). A tensor with finite values beyond float16's range (|x| > 65504) is kept in
    float32 rather than turned into inf. Integer/bool tensors (e.g. BatchNorm's
    ``num_batches_tracked``) are stored unchanged.
    """
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"save_weights: {key!r} is a {type(value).__name__}, not a tensor")
        t = value.detach().cpu()
        if fp16 and t.is_floating_point() and t.dtype != torch.float16:
            finite = t[torch.isfinite(t)]
            if finite.numel() and float(finite.abs().max()) > _FP16_MAX:
                log.warning("save_weights: %s exceeds the float16 range; kept as %s", key, t.dtype)
            else:
                t = t.to(torch.float16)
        tensors[key] = t.contiguous().clone()  # clone: safetensors refuses tensors sharing storage
    data = st_save(tensors, metadata=dict(metadata) if metadata else None)
    _atomic_write(Path(path), data)
    return hashlib.sha256(data).hexdigest()


def _declared_size(data: bytes) -> int | None:
    """File size the safetensors header promises (8 + header + tensor data), None if unparsable."""
    if len(data) < 8:
        return None
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or 8 + n > len(data):
        return None
    try:
        header = json.loads(data[8:8 + n])
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None
    return 8 + n + max(ends, default=0)


def load_weights(path: str | os.PathLike, expected_sha256: str) -> dict[str, torch.Tensor]:
    """Load a verified safetensors file; float16/bfloat16 tensors come back as float32.

    Raises :class:`ModelError` naming the file and the expected sha256 when the file is missing,
    empty, truncated, altered or not a safetensors file.
    """
    path = Path(path)
    expected = (expected_sha256 or "").strip().lower()
    fix = "re-checkout models/ (git checkout -- models/, or git lfs pull) or re-export the model"
    if len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected):
        raise ModelError(f"{path}: no valid sha256 recorded for it in {METADATA_FILE} (got {expected_sha256!r}); "
                         "refusing to load unverified weights")
    try:
        if not path.is_file():
            what = "is a directory, not a weights file" if path.is_dir() else "not found"
            raise ModelError(f"{path}: {what} (expected sha256 {expected}); {fix}")
        data = path.read_bytes()
    except ModelError:
        raise
    except OSError as exc:
        raise ModelError(f"{path}: cannot read ({exc.strerror or exc}) (expected sha256 {expected})") from None
    if not data:
        raise ModelError(f"{path}: empty file (0 bytes; expected sha256 {expected}); {fix}")
    got = hashlib.sha256(data).hexdigest()
    if got != expected:
        declared = _declared_size(data)
        if data.startswith(b"version https://git-lfs"):
            why = "file is a Git LFS pointer, not the weights"
        elif declared is None:
            why = "file is truncated or not a safetensors file"
        elif declared > len(data):
            why = f"file is truncated ({len(data)} of {declared} bytes)"
        else:
            why = "file was altered (tampered with or replaced)"
        raise ModelError(f"{path}: sha256 mismatch (expected {expected}, got {got[:16]}...): {why}; {fix}")
    try:
        tensors = st_load(data)
    except Exception as exc:  # SafetensorError, ValueError, ...: a file whose recorded hash was wrong
        raise ModelError(f"{path}: not a valid safetensors file ({' '.join(str(exc).split())[:120]}) "
                         f"although it matches sha256 {expected}; re-export the model") from None
    return {k: (v.float() if v.dtype in (torch.float16, torch.bfloat16) else v) for k, v in tensors.items()}


# ---- metadata.json ------------------------------------------------------------------------------------

def _json_default(obj: Any) -> Any:
    """Serialise the numpy / torch / pathlib values that training code tends to leave in dicts."""
    if hasattr(obj, "tolist"):  # numpy arrays and scalars, torch tensors
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"metadata.json: cannot store a {type(obj).__name__}")


def read_metadata(models_dir: str | os.PathLike) -> dict[str, Any]:
    """The model card ``<models_dir>/metadata.json`` as a dict (ModelError if missing or invalid)."""
    path = Path(models_dir) / METADATA_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelError(f"no model installed yet: {path} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno} ({exc.msg}); "
                         "restore it with git checkout -- models/") from None
    if not isinstance(meta, dict):
        raise ModelError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    return meta


def write_metadata(models_dir: str | os.PathLike, meta: Mapping[str, Any]) -> Path:
    """Write ``metadata.json`` atomically: 2-space indent, sorted keys, trailing newline, so the same
    content always gives the same bytes (clean git diffs)."""
    path = Path(models_dir) / METADATA_FILE
    text = json.dumps(meta, indent=2, sort_keys=True, ensure_ascii=False, default=_json_default) + "\n"
    _atomic_write(path, text.encode("utf-8"))
    return path
