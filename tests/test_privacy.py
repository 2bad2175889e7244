"""Privacy (issue 14 item 3): a prediction opens no network connection and writes no file.

Every way Python reaches the network goes through ``socket.socket.connect`` / ``connect_ex`` /
``sendto`` or ``socket.create_connection`` / ``getaddrinfo``; they are wrapped to record any call
during model load + prediction + Grad-CAM. The working tree and the temp folder are checked for
new files too (uploads are processed in memory).
"""
from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import pytest

from lesiontriage.paths import models_dir

pytestmark = pytest.mark.skipif(not (models_dir() / "metadata.json").exists(), reason="no shipped models")


def _tree(root: Path) -> set[str]:
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in (".git", ".venv", "__pycache__", ".pytest_cache", "runs")]
        out.update(os.path.join(dirpath, f) for f in filenames)
    return out


def test_prediction_opens_no_socket_and_writes_no_file(monkeypatch, skin_photo, encode):
    calls: list[str] = []

    def record(name):
        def _blocked(*args, **kwargs):
            calls.append(f"{name}{args[1:] if name.startswith('socket.') else args}")
            raise OSError(f"network access attempted during prediction: {name}")
        return _blocked

    for attr in ("connect", "connect_ex", "sendto"):
        monkeypatch.setattr(socket.socket, attr, record(f"socket.{attr}"))
    monkeypatch.setattr(socket, "create_connection", record("create_connection"))
    monkeypatch.setattr(socket, "getaddrinfo", record("getaddrinfo"))

    repo = Path(__file__).resolve().parent.parent
    before_repo, before_tmp = _tree(repo), set(os.listdir(tempfile.gettempdir()))

    from lesiontriage import TriagePipeline

    pipe = TriagePipeline.from_dir()
    photo = encode(skin_photo(640, 480, seed=3), "JPEG", quality=90)
    result = pipe.predict(photo, name="upload.jpg")
    if result.lesions:
        pipe.gradcam(photo, 0, result=result, name="upload.jpg")
    assert calls == [], f"network calls during prediction: {calls}"
    assert _tree(repo) - before_repo == set()
    assert set(os.listdir(tempfile.gettempdir())) - before_tmp == set()
