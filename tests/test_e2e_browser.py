"""Real-browser end-to-end test: `streamlit run app.py` on a loopback port, driven by Playwright for
Python with Debian's chromium (headless).

Two variants:
- ``stand-in``: the app with the contract-honouring stand-in pipeline of tests/test_app.py (served by
  a small wrapper script in a temporary folder), so the browser path is tested before and
  independently of trained weights;
- ``shipped``: the real app on the shipped models (skipped until models/ holds them); it logs the
  timings the app issue asks for: first result after a cold start, a cached re-run, an aggregation
  switch (written to test-artifacts/e2e_timings.json, not asserted as timings).

Each variant uploads a generated demo scene (synthetic), waits for "Triage score" and "lesions
found", switches the aggregation, downloads the CSV, uploads a broken file (error shown, app keeps
working) and saves screenshots under test-artifacts/ (git-ignored).
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from lesiontriage import app_support as sup
from lesiontriage.paths import MODELS_DIR, REPO_ROOT

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-quic", "--no-first-run"]
ARTIFACTS = REPO_ROOT / "test-artifacts"
VIEWPORT = {"width": 1440, "height": 900}

pytestmark = pytest.mark.e2e


def _skip_reason() -> str | None:
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        return f"{CHROMIUM} not installed (run .ci/install_browser.sh, or apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright for Python not installed (pip install -e '.[test]')"
    return None


if (_reason := _skip_reason()) is not None:
    pytest.skip(_reason, allow_module_level=True)

from playwright.sync_api import expect, sync_playwright  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


WRAPPER = """
# Serves app.py with the stand-in pipeline of tests/test_app.py (end-to-end test only).
import runpy, sys
sys.path[:0] = [{repo!r}, {tests!r}]
from lesiontriage import app_support as sup
from test_app import FakePipeline
_pipe = FakePipeline()
sup.model_installed = lambda models=None: True
sup.load_pipeline = lambda models=None: _pipe
runpy.run_path({app!r}, run_name="__main__")
"""


class Server:
    """`streamlit run` as a subprocess on 127.0.0.1; stopped (by its own pid) on exit."""

    def __init__(self, script: Path, cwd: Path, env: dict[str, str], name: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        ARTIFACTS.mkdir(exist_ok=True)
        self.log = ARTIFACTS / f"e2e_streamlit_{name}.log"
        cmd = [sys.executable, "-m", "streamlit", "run", str(script), "--server.port", str(self.port),
               "--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false"]
        self._log_fh = open(self.log, "w")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=self._log_fh, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 90.0) -> float:
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"streamlit exited early ({self.proc.returncode}); see {self.log}")
            try:
                with urllib.request.urlopen(self.url + "/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        return time.perf_counter() - self.started
            except OSError:
                time.sleep(0.3)
        raise TimeoutError(f"streamlit not healthy after {timeout:.0f} s; see {self.log}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log_fh.close()


def _hex_ip(h: str) -> str:
    """/proc/net/tcp address (little-endian hex per 32-bit word) -> dotted / colon notation."""
    raw = bytes.fromhex(h)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return socket.inet_ntop(socket.AF_INET if len(words) == 4 else socket.AF_INET6, words)


def remote_peers(pid: int) -> set[str]:
    """Remote IPs of every connected TCP socket the process holds (Linux /proc; empty elsewhere)."""
    try:
        inodes = {os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1] for fd in os.listdir(f"/proc/{pid}/fd")
                  if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:[")}
    except OSError:
        return set()
    peers = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if cols[9] in inodes and cols[3] != "0A":  # 0A = LISTEN
                peers.add(_hex_ip(cols[2].split(":")[0]))
    return peers


def is_loopback(ip: str) -> bool:
    return ip.startswith("127.") or ip in ("::1", "::ffff:127.0.0.1", "0.0.0.0", "::") or ip.startswith("::ffff:127.")


class PeerWatch(threading.Thread):
    """Samples the server's TCP peers every 100 ms while the browser drives it."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peers, self._stop_evt = pid, set(), threading.Event()

    def run(self) -> None:
        while not self._stop_evt.is_set():
            self.peers |= remote_peers(self.pid)
            self._stop_evt.wait(0.1)

    def stop(self) -> set[str]:
        self._stop_evt.set()
        self.join(5)
        return self.peers


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMLIT_")}
    env.update(extra)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="module")
def browser():
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def scene_file(tmp_path) -> Path:
    ex = sup.synthetic_examples()[0]
    data, name = sup.load_example(ex)
    path = tmp_path / name
    path.write_bytes(data)
    return path


def wait_idle(page, timeout: float = 60_000) -> None:
    """Wait until the script run has finished: the app reports its script as not running (the
    'Running...' widget only shows after a delay, so it alone can miss a run that has just begun),
    no 'Running...' widget and no stale element left."""
    page.wait_for_timeout(100)
    page.locator('[data-testid="stApp"][data-test-script-state="notRunning"]').wait_for(state="attached", timeout=timeout)
    page.locator('[data-testid="stStatusWidget"]').wait_for(state="hidden", timeout=timeout)
    page.wait_for_function("() => document.querySelectorAll('[data-stale=\"true\"]').length === 0", timeout=timeout)


def full_screenshot(page, path: Path) -> None:
    """Streamlit scrolls inside its own container, so full_page=True shows only the viewport:
    make the viewport as tall as the content instead, then restore it."""
    height = page.evaluate("() => Math.max(...[...document.querySelectorAll('[data-testid=\"stMain\"], "
                           "[data-testid=\"stMainBlockContainer\"]')].map(e => e.scrollHeight), 900)")
    page.set_viewport_size({"width": VIEWPORT["width"], "height": min(int(height) + 100, 6000)})
    page.wait_for_timeout(1500)  # tables and charts re-render after a resize
    page.screenshot(path=str(path))
    page.set_viewport_size(VIEWPORT)


def score_text(page) -> str:
    metric = page.locator('[data-testid="stMetric"]', has_text="Triage score")
    return metric.locator('[data-testid="stMetricValue"]').inner_text().strip()


def run_flow(browser, server: Server, scene: Path, tmp_path: Path, variant: str, first_timeout_s: float) -> dict:
    timings: dict[str, float] = {"server_start_s": round(server.wait_ready(), 2)}
    ctx = browser.new_context(viewport=VIEWPORT, accept_downloads=True)
    page = ctx.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    requested: set[str] = set()
    page.on("request", lambda r: requested.add(urllib.parse.urlsplit(r.url).netloc or urllib.parse.urlsplit(r.url).scheme))
    watch = PeerWatch(server.proc.pid)
    watch.start()
    try:
        t0 = time.perf_counter()
        page.goto(server.url, wait_until="domcontentloaded")
        expect(page.get_by_text("Skin-lesion triage", exact=True)).to_be_visible(timeout=first_timeout_s * 1000)
        banner = page.get_by_text("Intended use:")
        expect(banner).to_be_visible()
        box = banner.bounding_box()
        assert box is not None and box["y"] + box["height"] <= VIEWPORT["height"], "intended use must be above the fold"

        # 1. first result (cold: the pipeline loads on the first page visit, and the uploader appears after it)
        page.locator('input[type="file"]').first.set_input_files(str(scene), timeout=first_timeout_s * 1000)
        expect(page.get_by_text("Triage score")).to_be_visible(timeout=first_timeout_s * 1000)
        expect(page.get_by_text(re.compile(r"lesions found", re.I)).first).to_be_visible()
        wait_idle(page)
        timings["first_result_s"] = round(time.perf_counter() - t0, 2)
        page.screenshot(path=str(ARTIFACTS / f"e2e_{variant}_result.png"), full_page=False)
        full_screenshot(page, ARTIFACTS / f"e2e_{variant}_result_full.png")
        first_score = score_text(page)
        assert re.fullmatch(r"\d\.\d\d", first_score), first_score

        # 2. clicking a row of the lesion table highlights that lesion (caption of the boxed photo)
        caption = page.locator('[data-testid="stImageCaption"]').first
        m = re.search(r"(\d+) lesions? found.*lesion #(\d+) highlighted", caption.inner_text())
        if m and int(m.group(1)) >= 2:
            grid = page.locator('[class*="st-key-lesion_table_"] .stDataFrame').first
            grid.scroll_into_view_if_needed()
            bb = grid.bounding_box()
            page.mouse.click(bb["x"] + 15, bb["y"] + 35 + 64 * 1.5)  # row-select cell of the 2nd row
            expect(caption).not_to_contain_text(f"lesion #{m.group(2)} highlighted", timeout=30_000)
            wait_idle(page)
            page.screenshot(path=str(ARTIFACTS / f"e2e_{variant}_row_selected.png"))

        # 3. aggregation switch: no model re-run
        target = "Max"
        option = page.locator(".st-key-aggregation").get_by_role("radio", name=target, exact=True)
        t1 = time.perf_counter()
        option.click()
        expect(option).to_have_attribute("aria-checked", "true")
        expect(page.get_by_text(f"Score by {target}:")).to_be_visible(timeout=30_000)  # the re-run has landed
        timings["aggregation_switch_s"] = round(time.perf_counter() - t1, 3)
        wait_idle(page)

        # 4. CSV download reflects the chosen aggregation
        with page.expect_download() as dl_info:
            page.get_by_role("button", name="CSV", exact=True).click()
        dl = dl_info.value
        csv_path = ARTIFACTS / f"e2e_{variant}_{dl.suggested_filename}"
        dl.save_as(str(csv_path))
        rows = list(csv.DictReader(io.StringIO(csv_path.read_text())))
        assert rows and rows[0]["aggregate"] == "max" and rows[0]["image"] == scene.name
        assert {"image_score", "tier", "p_malignant", "detector_score"} <= set(rows[0])
        assert float(rows[0]["image_score"]) == pytest.approx(float(score_text(page)), abs=0.006)

        # 5. a broken upload: an error with the reason, and the app keeps working
        bad = tmp_path / "broken.jpg"
        bad.write_bytes(b"not an image at all")
        page.locator('input[type="file"]').first.set_input_files(str(bad))
        expect(page.locator('[data-testid="stAlert"]', has_text="broken.jpg")).to_be_visible(timeout=30_000)
        expect(page.get_by_text("Triage score")).to_have_count(0)
        page.screenshot(path=str(ARTIFACTS / f"e2e_{variant}_bad_upload.png"))

        # 6. cached re-run: the same image again in a fresh session (the result cache is per process)
        page.reload(wait_until="domcontentloaded")
        expect(page.get_by_text("Skin-lesion triage", exact=True)).to_be_visible(timeout=30_000)
        wait_idle(page)
        t2 = time.perf_counter()
        page.locator('input[type="file"]').first.set_input_files(str(scene))
        expect(page.get_by_text("Triage score")).to_be_visible(timeout=30_000)
        wait_idle(page)
        timings["cached_rerun_s"] = round(time.perf_counter() - t2, 3)
        assert score_text(page) == first_score  # default aggregation again, same cached result

        # 7. the other pages render without an exception block
        for name in ("Evaluation", "Clinical & management", "Speed & reliability", "Model card"):
            page.get_by_role("link", name=name).click()
            expect(page.get_by_role("heading", name=name.split(" &")[0], exact=False).first).to_be_visible(timeout=30_000)
            wait_idle(page)
            assert page.locator('[data-testid="stException"]').count() == 0, name
        page.screenshot(path=str(ARTIFACTS / f"e2e_{variant}_model_card.png"), full_page=False)
        assert not errors, errors
        # privacy: the page loaded nothing from elsewhere and the server talked to no one but loopback
        outside = {h for h in requested if h not in (f"127.0.0.1:{server.port}", "data", "blob")}
        assert not outside, f"browser requests left the app: {outside}"
        peers = watch.stop()
        assert all(is_loopback(ip) for ip in peers), f"server connected outside loopback: {peers}"
        timings["server_peers"] = sorted(peers)
    finally:
        watch.stop()
        ctx.close()
    return timings


def _log_timings(variant: str, timings: dict) -> None:
    path = ARTIFACTS / "e2e_timings.json"
    allt = json.loads(path.read_text()) if path.is_file() else {}
    allt[variant] = {**timings, "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
    path.write_text(json.dumps(allt, indent=2))
    print(f"\n[e2e timings] {variant}: {json.dumps(timings)}")


def test_browser_flow_with_stand_in_pipeline(browser, scene_file, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "pages").symlink_to(REPO_ROOT / "pages", target_is_directory=True)
    shutil.copytree(REPO_ROOT / ".streamlit", site / ".streamlit")
    script = site / "app.py"
    script.write_text(textwrap.dedent(WRAPPER.format(repo=str(REPO_ROOT), tests=str(REPO_ROOT / "tests"),
                                                     app=str(REPO_ROOT / "app.py"))))
    empty = tmp_path / "no_models"
    empty.mkdir()
    server = Server(script, site, _env(LESIONTRIAGE_MODELS=str(empty)), "stand-in")
    try:
        timings = run_flow(browser, server, scene_file, tmp_path, "stand-in", first_timeout_s=60)
    finally:
        server.stop()
    _log_timings("stand-in", timings)


@pytest.mark.models
@pytest.mark.skipif(not sup.model_installed(MODELS_DIR),
                    reason="no trained model in models/ yet (models/metadata.json lists no classifier)")
def test_browser_flow_with_shipped_models(browser, scene_file, tmp_path):
    server = Server(REPO_ROOT / "app.py", REPO_ROOT, _env(), "shipped")
    try:
        timings = run_flow(browser, server, scene_file, tmp_path, "shipped", first_timeout_s=120)
    finally:
        server.stop()
    _log_timings("shipped", timings)


def test_no_model_page_in_the_browser(browser, tmp_path):
    empty = tmp_path / "no_models"
    empty.mkdir()
    server = Server(REPO_ROOT / "app.py", REPO_ROOT, _env(LESIONTRIAGE_MODELS=str(empty)), "no-model")
    try:
        server.wait_ready()
        ctx = browser.new_context(viewport=VIEWPORT)
        page = ctx.new_page()
        # a direct link as the server's very first request must still get app.py's navigation
        # (Streamlit would otherwise run pages/evaluation.py alone, listing every file in pages/)
        page.goto(server.url + "/evaluation", wait_until="domcontentloaded")
        expect(page.get_by_role("heading", name="Evaluation").first).to_be_visible(timeout=60_000)
        wait_idle(page)
        nav = page.locator('[data-testid="stSidebarNav"]')
        expect(nav).to_contain_text("Triage a photo")
        expect(nav).not_to_contain_text("ui common")
        expect(page.get_by_text("No report yet").first).to_be_visible()
        page.goto(server.url, wait_until="domcontentloaded")
        expect(page.get_by_text("No model installed yet", exact=True)).to_be_visible(timeout=60_000)
        expect(page.get_by_text("Intended use:")).to_be_visible()
        expect(page.locator('[data-testid="stCode"]')).to_contain_text("lesiontriage train classifier")
        assert page.locator('[data-testid="stException"]').count() == 0
        page.screenshot(path=str(ARTIFACTS / "e2e_no_model.png"))
        ctx.close()
    finally:
        server.stop()
