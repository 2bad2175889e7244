"""Pieces every training loop shares: config files, seeding, checkpoints, CPU speed settings.

Runs are designed for a 2-core CPU: bf16 autocast + channels_last (measured ~1.5x faster than
fp32 here), checkpoints every few minutes so a killed run resumes with ``--resume``.
"""
from __future__ import annotations

import contextlib
import logging
import random
import shlex
import sys
import time
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

log = logging.getLogger(__name__)


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config; a bare name is looked up in the packaged configs folder."""
    p = Path(path)
    if not p.exists():
        packaged = Path(__file__).parent / "configs" / p.name
        if not packaged.suffix:
            packaged = packaged.with_suffix(".toml")
        if packaged.exists():
            p = packaged
        else:
            raise FileNotFoundError(f"{path}: config file not found")
    with open(p, "rb") as fh:
        return tomllib.load(fh)


def dataclass_from_dict(cls: type, d: dict[str, Any]):
    """Build a config dataclass from a dict, refusing unknown keys (typos must not pass silently)."""
    names = {f.name for f in fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown keys for {cls.__name__}: {sorted(unknown)}")
    return cls(**d)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def command_line() -> str:
    """The command that started this process, for provenance in metadata and reports."""
    argv = list(sys.argv)
    if argv and argv[0].endswith(("lesiontriage", "cli.py")):
        argv[0] = "lesiontriage"
    return " ".join(shlex.quote(a) for a in argv)


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX-BF16).

    Why: bf16 autocast was ~1.5x faster than fp32 on the AVX512-BF16 machine the recipes were
    measured on, but on an AVX2-only CPU it is emulated and ~30x slower (measured 2026-12-06 on a
    2-core AMD EPYC: Lite2 batch 32 training step 3 s fp32, > 60 s bf16)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = set(cpuinfo.replace("\n", " ").split())
    return bool({"avx512_bf16", "amx_bf16"} & flags)


@contextlib.contextmanager
def autocast(enabled: bool) -> Iterator[None]:
    """bf16 autocast on CPU where the CPU has native bf16; fp32 otherwise (and when disabled)."""
    if enabled and cpu_has_native_bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield
    else:
        yield


def save_checkpoint(path: Path, **state: Any) -> None:
    """Atomic write so a kill mid-save never leaves a corrupt checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


@dataclass
class Timer:
    """Seconds since construction; used to checkpoint every few minutes and to cap run length."""

    start: float = field(default_factory=time.monotonic)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start


def save_result(run_dir: Path, out: dict[str, Any]) -> None:
    """The run's summary (config, history, best epoch, command) so export can be redone later."""
    import json

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "result.json").write_text(json.dumps(out, indent=2, default=str))


def load_result(run_dir: Path) -> dict[str, Any]:
    import json

    path = run_dir / "result.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no finished run to export (train first)")
    return json.loads(path.read_text())


def load_shipped_state(key: str, models_dir: Path | None = None) -> dict[str, torch.Tensor]:
    """The state dict of a shipped model (``models/<key>.safetensors``), verified against metadata.json."""
    from lesiontriage.paths import MODELS_DIR
    from lesiontriage.weights import load_weights, read_metadata

    models_dir = Path(models_dir or MODELS_DIR)
    entry = read_metadata(models_dir)["models"][key]
    return load_weights(models_dir / entry["file"], entry["sha256"])
