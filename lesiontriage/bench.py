"""`lesiontriage bench`: measured speed of the shipped pipeline vs the seed paper's configuration.

Not a test: timings depend on the machine. Prints a table and writes models/reports/bench.json.
The seed configuration (Faster R-CNN ResNet-50-FPN at 800 px + ResNet-50 classifier, untrained
weights: speed does not depend on the weights' values) runs in the same process, same inputs,
so the speed ratio is measured side by side.
"""
from __future__ import annotations

import datetime as dt
import io
import json
import platform
import resource
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from lesiontriage.paths import REPORTS_DIR


@dataclass
class StageStats:
    median_ms: float
    p95_ms: float
    n: int


@dataclass
class BenchReport:
    command: str
    date: str
    machine: dict[str, str]
    load_s: dict[str, float]
    stages: dict[str, dict[str, StageStats]] = field(default_factory=dict)  # image kind -> stage -> stats
    seed_config: dict[str, dict[str, StageStats]] = field(default_factory=dict)
    throughput_images_per_s: dict[str, float] = field(default_factory=dict)
    peak_rss_mb: dict[str, float] = field(default_factory=dict)
    speed_ratio_end_to_end: dict[str, float] = field(default_factory=dict)
    inference_engine: dict[str, str] = field(default_factory=dict)  # model -> engine that ran it (fast copy or eager)
    notes: list[str] = field(default_factory=list)


def _cpu_name() -> str:
    """CPU model and its widest vector extension (timings differ a lot between AVX2 and AVX-512 CPUs)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name")), platform.machine())
    flags = next((l.split(":", 1)[1].split() for l in info.splitlines() if l.startswith("flags")), [])
    vec = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{name} ({vec})"


def _stats(ms: list[float]) -> StageStats:
    return StageStats(round(statistics.median(ms), 1), round(float(np.percentile(ms, 95)), 1), len(ms))


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


BENCH_SHOTS: dict[str, dict[str, Any]] = {
    "dermoscopy_600x450": {"size": (600, 450)},
    "phone_4032x3024": {"size": (4032, 3024)},
    # One large lesion, no stamp: the close-up path (the detector, the lesion classifier, then the blend's whole-image
    # and full-frame views), which the multi-spot shots above never reach. Its box covers ~9% of the frame (inside the
    # soft gate's ramp); the detector does not take a synthetic blob of a quarter of the side for a lesion.
    "closeup_4032x3024": {"size": (4032, 3024), "n_lesions": 1, "radius": (0.12, 0.14), "stamp": False},
}


def bench_images(out_dir: Path, seed: int = 0) -> dict[str, Path]:
    """Generated, synthetic JPEGs (q90): a 600x450 dermoscopy-sized scene, a 4032x3024 phone scene of several spots
    and a 4032x3024 phone close-up of one lesion (``BENCH_SHOTS``)."""
    from lesiontriage.data.demo_scene import make_demo_scene

    paths = {}
    for kind, shot in BENCH_SHOTS.items():
        rgb, _ = make_demo_scene(seed=seed, **shot)
        p = out_dir / f"{kind}.jpg"
        Image.fromarray(rgb).save(p, quality=90)
        paths[kind] = p
    return paths


def time_pipeline(pipe, path: Path, repeats: int) -> dict[str, StageStats]:
    """Per-stage latency over ``repeats`` predictions (+ Grad-CAM of the first lesion)."""
    per_stage: dict[str, list[float]] = {}
    e2e = []
    res = None
    for _ in range(repeats):
        t = time.perf_counter()
        res = pipe.predict(path)
        e2e.append((time.perf_counter() - t) * 1000)
        for k, v in res.timings_ms.items():
            per_stage.setdefault(k, []).append(v)
    per_stage["end_to_end"] = e2e
    if res is not None and res.lesions:
        img = pipe.load(path)
        cam = []
        for _ in range(max(2, repeats // 3)):
            t = time.perf_counter()
            pipe.gradcam(img, 0, result=res)
            cam.append((time.perf_counter() - t) * 1000)
        per_stage["gradcam"] = cam
    return {k: _stats(v) for k, v in per_stage.items()}


class SeedPaperConfig:
    """Faster R-CNN ResNet-50-FPN (800 px) + ResNet-50 classifier at 224 on each detected box."""

    def __init__(self) -> None:
        from torchvision.models import resnet50
        from torchvision.models.detection import fasterrcnn_resnet50_fpn

        self.detector = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=2,
                                                min_size=800, max_size=1333).eval()
        self.classifier = resnet50(weights=None, num_classes=2).eval()

    def predict(self, path: Path, n_lesions: int) -> dict[str, float]:
        t0 = time.perf_counter()
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
        t1 = time.perf_counter()
        x = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
        with torch.inference_mode():
            self.detector([x])
            t2 = time.perf_counter()
            # Untrained boxes are meaningless: classify as many crops as our pipeline found.
            self.classifier(torch.randn(max(1, n_lesions), 3, 224, 224))
        t3 = time.perf_counter()
        return {"decode": (t1 - t0) * 1000, "detect": (t2 - t1) * 1000, "classify": (t3 - t2) * 1000,
                "end_to_end": (t3 - t0) * 1000}


def run_bench(models_dir: Path | None = None, repeats: int = 7, folder_images: int = 12, seed_config: bool = True,
              out: Path | None = REPORTS_DIR / "bench.json", command: str = "lesiontriage bench") -> BenchReport:
    from lesiontriage.pipeline import TriagePipeline

    t = time.perf_counter()
    pipe = TriagePipeline.from_dir(models_dir)
    load_s = {"lesiontriage": round(time.perf_counter() - t, 2)}
    report = BenchReport(command=command, date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                         machine={"cpu": _cpu_name(), "threads": str(torch.get_num_threads()),
                                  "torch": torch.__version__, "python": platform.python_version()},
                         load_s=load_s,
                         inference_engine={k: v["engine"] for k, v in pipe.inference_engine.items()})
    with tempfile.TemporaryDirectory() as tmp:
        imgs = bench_images(Path(tmp))
        for kind, p in imgs.items():
            pipe.predict(p)  # warm-up
            report.stages[kind] = time_pipeline(pipe, p, repeats)
        # Folder throughput: phone photos of different content.
        from lesiontriage.data.demo_scene import make_demo_scene

        folder = []
        for i in range(folder_images):
            rgb, _ = make_demo_scene(seed=100 + i, size=(4032, 3024))
            fp = Path(tmp) / f"folder_{i:02d}.jpg"
            Image.fromarray(rgb).save(fp, quality=90)
            folder.append(fp)
        t = time.perf_counter()
        pipe.predict_batch(folder)
        report.throughput_images_per_s["phone_4032x3024_folder"] = round(len(folder) / (time.perf_counter() - t), 2)
        report.peak_rss_mb["lesiontriage"] = round(_peak_rss_mb(), 1)
        if seed_config:
            t = time.perf_counter()
            seed = SeedPaperConfig()
            load_s["seed_config_build"] = round(time.perf_counter() - t, 2)
            for kind, p in imgs.items():
                n = max(1, pipe.predict(p).n_lesions)
                seed.predict(p, n)
                runs: dict[str, list[float]] = {}
                for _ in range(max(3, repeats // 2)):
                    for k, v in seed.predict(p, n).items():
                        runs.setdefault(k, []).append(v)
                report.seed_config[kind] = {k: _stats(v) for k, v in runs.items()}
                ours = report.stages[kind]["end_to_end"].median_ms
                report.speed_ratio_end_to_end[kind] = round(report.seed_config[kind]["end_to_end"].median_ms / ours, 2)
            report.peak_rss_mb["after_seed_config"] = round(_peak_rss_mb(), 1)
            report.notes.append("seed config = torchvision fasterrcnn_resnet50_fpn (min_size 800) + resnet50 at 224 px, "
                                "untrained weights, as many crops as lesiontriage found; ratio = seed / ours (median e2e)")
    report.notes.append("bench images are generated synthetic scenes (lesiontriage.data.demo_scene), JPEG q90")
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(asdict(report), indent=2))
    return report
