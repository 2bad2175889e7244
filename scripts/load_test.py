#!/usr/bin/env python3
"""Load test: N simultaneous browser sessions against `streamlit run app.py` on loopback.

Each session (its own browser context, so its own Streamlit session) loops until the time is up:
upload a photo it has not sent before (so the model really runs; the result cache is shared by all
sessions), wait for "Triage score", switch the aggregation, wait for the re-run. It records the
latency of each step and every error (timeouts, error boxes, exceptions, browser errors), then
prints percentiles and writes them as JSON.

    python scripts/load_test.py --sessions 4 --duration 120 --out models/reports/load_test.json
    python scripts/load_test.py --url http://127.0.0.1:8501      # an app that is already running
    python scripts/load_test.py --stand-in --duration 30          # the harness itself, no models needed

Needs playwright for Python and Debian's chromium (/usr/bin/chromium); nothing leaves 127.0.0.1.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-quic", "--no-first-run"]
STAND_IN = """
import runpy, sys
sys.path[:0] = [{repo!r}, {tests!r}]
from lesiontriage import app_support as sup
from test_app import FakePipeline
_pipe = FakePipeline()
sup.model_installed = lambda models=None: True
sup.load_pipeline = lambda models=None: _pipe
runpy.run_path({app!r}, run_name="__main__")
"""


@dataclass
class Stats:
    latencies: dict[str, list[float]] = field(default_factory=lambda: {"page_ready": [], "first_result": [],
                                                                         "result": [], "aggregation_switch": []})
    errors: list[str] = field(default_factory=list)
    results: int = 0
    n_sessions: int = 1
    upload_retries: int = 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(stand_in: bool, workdir: Path) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    script, cwd = REPO / "app.py", REPO
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMLIT_")}
    if stand_in:
        site = workdir / "site"
        site.mkdir()
        (site / "pages").symlink_to(REPO / "pages", target_is_directory=True)
        (site / ".streamlit").symlink_to(REPO / ".streamlit", target_is_directory=True)
        script = site / "app.py"
        script.write_text(textwrap.dedent(STAND_IN.format(repo=str(REPO), tests=str(REPO / "tests"), app=str(REPO / "app.py"))))
        cwd = site
        (workdir / "no_models").mkdir()
        env["LESIONTRIAGE_MODELS"] = str(workdir / "no_models")
    log = workdir / "streamlit.log"
    cmd = [sys.executable, "-m", "streamlit", "run", str(script), "--server.port", str(port), "--server.address",
           "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false"]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"streamlit exited early; see {log}")
        try:
            with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url, log
        except OSError:
            time.sleep(0.3)
    proc.terminate()
    raise SystemExit(f"streamlit not healthy after 90 s; see {log}")


def make_images(n: int, folder: Path, image: Path | None) -> list[Path]:
    """n distinct photos: generated synthetic scenes, or copies of --image with a different comment."""
    from PIL import Image

    from lesiontriage import app_support as sup

    out = []
    for i in range(n):
        path = folder / f"load_{i:04d}.jpg"
        if image is None:
            path.write_bytes(sup.jpeg_bytes(sup.fallback_scene(1000 + i)))
        else:
            with Image.open(image) as im:  # re-encode with a unique comment so every upload misses the cache
                im.convert("RGB").save(path, "JPEG", quality=92, comment=f"load test {i}".encode())
        out.append(path)
    return out


async def wait_idle(page, timeout_ms: float) -> None:
    await page.locator('[data-testid="stStatusWidget"]').wait_for(state="hidden", timeout=timeout_ms)
    await page.wait_for_function("() => document.querySelectorAll('[data-stale=\"true\"]').length === 0",
                                 timeout=timeout_ms)


async def upload(page, img: Path, stats: Stats, tries: int = 3) -> None:
    """Set the file and check the uploader took it (a file set while a re-run redraws the widget can be
    dropped by the browser; a user would simply pick it again)."""
    for attempt in range(tries):
        await page.locator('input[type="file"]').first.set_input_files(str(img))
        try:
            await page.locator(f'[data-testid="stFileChipName"][title="{img.name}"]').wait_for(timeout=5_000)
            return
        except Exception:
            if attempt == tries - 1:
                raise
            stats.upload_retries += 1


async def session(idx: int, browser, url: str, images: list[Path], deadline: float, stats: Stats,
                  timeout_s: float) -> None:
    from playwright.async_api import TimeoutError as PWTimeout

    ctx = await browser.new_context(viewport={"width": 1440, "height": 900})
    page = await ctx.new_page()
    page.on("pageerror", lambda e: stats.errors.append(f"session {idx}: browser error: {e}"))
    timeout_ms = timeout_s * 1000
    try:
        t = time.perf_counter()
        await page.goto(url, wait_until="domcontentloaded")
        await page.get_by_text("Skin-lesion triage", exact=True).wait_for(timeout=timeout_ms)
        if await page.get_by_text("No model installed yet", exact=True).count():
            stats.errors.append(f"session {idx}: the app has no model installed")
            return
        stats.latencies["page_ready"].append(time.perf_counter() - t)
        first, step = True, ""
        aggs = ["Max", "Noisy-OR", "Mean"]
        for it in range(10**9):
            if time.time() >= deadline:
                break
            # each session has its own photos (no cache hit across sessions) until they run out
            img = images[(idx + stats.n_sessions * it) % len(images)]
            k = it
            try:
                step = "upload"
                t = time.perf_counter()
                await upload(page, img, stats)
                step = "result caption"
                await page.locator('[data-testid="stImageCaption"]', has_text=img.name).first.wait_for(timeout=timeout_ms)
                step = "triage score"
                await page.get_by_text("Triage score").first.wait_for(timeout=timeout_ms)
                step = "idle after result"
                await wait_idle(page, timeout_ms)
                stats.latencies["first_result" if first else "result"].append(time.perf_counter() - t)
                stats.results += 1
                first = False
                if await page.locator('[data-testid="stException"]').count():
                    stats.errors.append(f"session {idx}: exception shown for {img.name}")
                if await page.locator('[data-testid="stAlert"]', has_text="could not").count():
                    stats.errors.append(f"session {idx}: error box for {img.name}")
                option = page.locator(".st-key-aggregation").get_by_role("radio", name=aggs[k % 3], exact=True)
                if await option.count() and await option.get_attribute("aria-checked") != "true":
                    step = "aggregation switch"
                    t = time.perf_counter()
                    await option.click()
                    await page.get_by_text(f"Score by {aggs[k % 3]}:").wait_for(timeout=timeout_ms)
                    await wait_idle(page, timeout_ms)
                    stats.latencies["aggregation_switch"].append(time.perf_counter() - t)
            except PWTimeout as exc:
                if args_shots := os.environ.get("LOAD_TEST_SHOTS"):
                    await page.screenshot(path=f"{args_shots}/timeout_s{idx}_{img.stem}.png")
                stats.errors.append(f"session {idx}: timeout at step '{step}' ({img.name}): "
                                    f"{str(exc).splitlines()[0][:100]}")
                await page.goto(url, wait_until="domcontentloaded")  # start over, as a user would
    finally:
        await ctx.close()


def percentiles(xs: list[float]) -> dict[str, float | int]:
    if not xs:
        return {"n": 0}
    a = np.asarray(xs)
    return {"n": int(a.size), "p50_s": round(float(np.percentile(a, 50)), 3), "p90_s": round(float(np.percentile(a, 90)), 3),
            "p95_s": round(float(np.percentile(a, 95)), 3), "p99_s": round(float(np.percentile(a, 99)), 3),
            "max_s": round(float(a.max()), 3), "mean_s": round(float(a.mean()), 3)}


async def run(args: argparse.Namespace, url: str, images: list[Path]) -> tuple[Stats, float]:
    from playwright.async_api import async_playwright

    stats = Stats(n_sessions=args.sessions)
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS, headless=True)
        t0 = time.perf_counter()
        deadline = time.time() + args.duration
        await asyncio.gather(*(session(i, browser, url, images, deadline, stats, args.timeout)
                               for i in range(args.sessions)))
        wall = time.perf_counter() - t0
        await browser.close()
    return stats, wall


def model_sha256() -> dict[str, str]:
    from lesiontriage import app_support as sup

    meta = sup.load_metadata() or {}
    return {k: str(v.get("sha256", ""))[:16] for k, v in (meta.get("models") or {}).items() if isinstance(v, dict)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=4, help="simultaneous browser sessions (default 4)")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    ap.add_argument("--timeout", type=float, default=120.0, help="per-step timeout in seconds")
    ap.add_argument("--url", help="an already running app (loopback); default: start `streamlit run app.py`")
    ap.add_argument("--image", type=Path, help="photo to upload (re-encoded per upload); default: synthetic scenes")
    ap.add_argument("--images", type=int, default=60, help="distinct photos to cycle through")
    ap.add_argument("--stand-in", action="store_true", help="serve the app with the tests' stand-in pipeline")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--out", type=Path, help="write the report as JSON here")
    args = ap.parse_args()
    if not os.access(args.chromium, os.X_OK):
        print(f"load_test: {args.chromium} not found (apt-get install chromium, or .ci/install_browser.sh)", file=sys.stderr)
        return 2
    if args.url and not args.url.startswith(("http://127.0.0.1", "http://localhost")):
        print("load_test: --url must be a loopback address", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="lesiontriage_load_") as tmp:
        work = Path(tmp)
        (work / "img").mkdir()
        images = make_images(args.images, work / "img", args.image)
        proc = None
        url = args.url
        if url is None:
            proc, url, _ = start_server(args.stand_in, work)
        try:
            stats, wall = asyncio.run(run(args, url, images))
        finally:
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
    report = {
        "command": "python scripts/load_test.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model_sha256": {} if args.stand_in else model_sha256(),
        "pipeline": "stand-in (tests)" if args.stand_in else "shipped models",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "sessions": args.sessions, "duration_s": args.duration, "wall_s": round(wall, 1),
        "results": stats.results, "results_per_min": round(stats.results / max(wall, 1e-9) * 60, 2),
        "errors": len(stats.errors), "error_examples": stats.errors[:20], "upload_retries": stats.upload_retries,
        "latency": [{"step": k, **percentiles(v)} for k, v in stats.latencies.items()],
    }
    print(f"\n{args.sessions} sessions x {args.duration:.0f} s on {url} ({report['pipeline']}): "
          f"{stats.results} results ({report['results_per_min']}/min), {len(stats.errors)} errors, "
          f"{stats.upload_retries} upload retries")
    print(f"{'step':<20}{'n':>5}{'p50 s':>9}{'p90 s':>9}{'p95 s':>9}{'p99 s':>9}{'max s':>9}")
    for row in report["latency"]:
        if row["n"]:
            print(f"{row['step']:<20}{row['n']:>5}{row['p50_s']:>9.3f}{row['p90_s']:>9.3f}{row['p95_s']:>9.3f}"
                  f"{row['p99_s']:>9.3f}{row['max_s']:>9.3f}")
        else:
            print(f"{row['step']:<20}{0:>5}")
    for e in stats.errors[:10]:
        print("  error:", e)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")
    return 1 if stats.errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
