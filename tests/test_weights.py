"""Weights integrity (issue 14 item 4) and metadata.json handling."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from lesiontriage.errors import ModelError
from lesiontriage.weights import load_weights, read_metadata, save_weights, sha256_file, write_metadata


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 5), torch.nn.BatchNorm2d(32), torch.nn.Linear(32, 2))
    for p in net.parameters():
        torch.nn.init.normal_(p, generator=g)
    sd = dict(net.state_dict())
    sd["extra.double"] = torch.randn(5, generator=g, dtype=torch.float64)
    sd["extra.mask"] = torch.tensor([True, False, True])
    return sd


def test_round_trip_fp32_is_exact(tmp_path: Path):
    sd = _state()
    path = tmp_path / "m.safetensors"
    sha = save_weights(sd, path)
    assert sha == sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    back = load_weights(path, sha)
    assert back.keys() == sd.keys()
    for k, v in sd.items():
        assert back[k].dtype == v.dtype, k
        assert torch.equal(back[k], v), k
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)
    assert not list(tmp_path.glob(".*tmp")), "no temporary file left behind"


def test_round_trip_fp16_halves_floats_and_returns_float32(tmp_path: Path):
    sd = _state()
    p32, p16 = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_weights(sd, p32)
    sha = save_weights(sd, p16, fp16=True)
    with safe_open(str(p16), "pt") as f:
        stored = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert stored["0.weight"] == "F16" and stored["extra.double"] == "F16"
    assert stored["1.num_batches_tracked"] == "I64" and stored["extra.mask"] == "BOOL"
    assert p16.stat().st_size < 0.6 * p32.stat().st_size
    back = load_weights(p16, sha)
    for k, v in sd.items():
        if v.is_floating_point():
            assert back[k].dtype == torch.float32, k
            assert torch.equal(back[k], v.half().float()), k
        else:
            assert torch.equal(back[k], v), k
    # a model loads the fp16 weights as is
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 5), torch.nn.BatchNorm2d(32), torch.nn.Linear(32, 2))
    net.load_state_dict({k: v for k, v in back.items() if not k.startswith("extra.")})


def test_fp16_keeps_out_of_range_tensors_in_fp32(tmp_path: Path):
    sd = {"big": torch.tensor([1.0, 1e6]), "small": torch.tensor([1.0, 2.0])}
    sha = save_weights(sd, tmp_path / "w.safetensors", fp16=True)
    back = load_weights(tmp_path / "w.safetensors", sha)
    assert torch.equal(back["big"], sd["big"]), "1e6 must not turn into inf"
    with safe_open(str(tmp_path / "w.safetensors"), "pt") as f:
        assert f.get_slice("big").get_dtype() == "F32" and f.get_slice("small").get_dtype() == "F16"


def test_shared_and_non_contiguous_tensors_are_saved(tmp_path: Path):
    base = torch.arange(12.0).reshape(3, 4)
    sd = {"a": base, "tied": base, "t": base.t()}
    sha = save_weights(sd, tmp_path / "w.safetensors")
    back = load_weights(tmp_path / "w.safetensors", sha)
    assert torch.equal(back["t"], base.t()) and torch.equal(back["tied"], base)
    with pytest.raises(TypeError, match="'x' is a int"):
        save_weights({"x": 3}, tmp_path / "bad.safetensors")


def _expect_model_error(path: Path, sha: str, *fragments: str) -> str:
    with pytest.raises(ModelError) as info:
        load_weights(path, sha)
    msg = str(info.value)
    assert str(path) in msg and sha in msg, msg
    for f in fragments:
        assert f in msg, msg
    assert "\n" not in msg
    return msg


def test_tampered_byte_is_refused(tmp_path: Path):
    path = tmp_path / "classifier.safetensors"
    sha = save_weights(_state(), path)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x01  # one bit of one weight
    path.write_bytes(bytes(data))
    msg = _expect_model_error(path, sha, "sha256 mismatch", "re-checkout models/")
    assert "altered" in msg
    assert f"got {hashlib.sha256(bytes(data)).hexdigest()[:16]}" in msg


def test_truncated_file_is_refused(tmp_path: Path):
    path = tmp_path / "detector.safetensors"
    sha = save_weights(_state(), path)
    full = path.stat().st_size
    path.write_bytes(path.read_bytes()[: full // 2])
    _expect_model_error(path, sha, "sha256 mismatch", f"truncated ({full // 2} of {full} bytes)")
    path.write_bytes(path.read_bytes()[:5])  # even the header is gone
    _expect_model_error(path, sha, "truncated or not a safetensors file")
    path.write_bytes(b"")
    _expect_model_error(path, sha, "empty file")


def test_missing_file_and_lfs_pointer(tmp_path: Path):
    sha = "ab" * 32
    _expect_model_error(tmp_path / "nope.safetensors", sha, "not found", "re-checkout models/")
    _expect_model_error(tmp_path, sha, "is a directory")
    ptr = tmp_path / "lfs.safetensors"
    ptr.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + sha + "\nsize 123\n")
    _expect_model_error(ptr, sha, "Git LFS pointer")


def test_hash_must_be_recorded(tmp_path: Path):
    path = tmp_path / "m.safetensors"
    sha = save_weights(_state(), path)
    assert load_weights(path, sha.upper() + "  ")  # case and whitespace do not matter
    for bad in ("", None, "abc", "z" * 64):
        with pytest.raises(ModelError, match="no valid sha256 recorded"):
            load_weights(path, bad)


def test_garbage_with_matching_hash_is_refused(tmp_path: Path):
    """A wrong hash recorded for a non-safetensors file still cannot load."""
    path = tmp_path / "odd.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    sha = sha256_file(path)
    _expect_model_error(path, sha, "not a valid safetensors file")


# ---- metadata.json -----------------------------------------------------------------------------------------


def test_metadata_missing_and_invalid(tmp_path: Path):
    with pytest.raises(ModelError, match=r"^no model installed yet: .*metadata.json not found$"):
        read_metadata(tmp_path)
    (tmp_path / "metadata.json").write_text('{"models": {,}')
    with pytest.raises(ModelError, match=r"metadata.json: invalid JSON at line 1 column 13"):
        read_metadata(tmp_path)
    (tmp_path / "metadata.json").write_text("[1, 2]")
    with pytest.raises(ModelError, match="expected a JSON object, got list"):
        read_metadata(tmp_path)


def test_metadata_round_trip_is_stable_and_sorted(tmp_path: Path):
    meta = {"models": {"classifier": {"sha256": "ab" * 32, "temperature": np.float32(1.5),
                                      "auc": np.array([0.9, 0.8]), "n": np.int64(7)}},
            "name": "lesiontriage", "changelog": [], "paths": {"root": tmp_path}, "tags": {"b", "a"}}
    out = write_metadata(tmp_path / "models", meta)
    first = out.read_bytes()
    back = read_metadata(tmp_path / "models")
    assert back["models"]["classifier"] == {"sha256": "ab" * 32, "temperature": 1.5, "auc": [0.9, 0.8], "n": 7}
    assert back["tags"] == ["a", "b"] and back["paths"]["root"] == str(tmp_path)
    text = first.decode()
    assert text.endswith("}\n") and '\n  "changelog": []' in text
    assert list(json.loads(text)) == sorted(json.loads(text))
    write_metadata(tmp_path / "models", back)
    assert out.read_bytes() == first, "same content must give the same bytes"
    with pytest.raises(TypeError):
        write_metadata(tmp_path / "models", {"x": object()})
    assert read_metadata(tmp_path / "models") == back, "a failed write must leave the old file intact"
