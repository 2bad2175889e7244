"""Networks: the packaged ImageNet weights really load (a silent loading bug cannot pass)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lesiontriage.networks.backbones import create_lite, create_lite_features, load_imagenet
from lesiontriage.networks.classifier import ClassifierConfig, LesionClassifier, shades_of_grey
from lesiontriage.networks.detector import DetectorConfig, build_detector

skimage_data = pytest.importorskip("skimage.data")

CAT_CLASSES = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def _prep(rgb: np.ndarray, size: int = 224) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(Image.fromarray(rgb).resize((size, size)))).permute(2, 0, 1).float() / 255
    return ((x - 0.5) / 0.5)[None]


@pytest.mark.parametrize("variant", ["lite0", "lite2"])
def test_packaged_imagenet_weights_recognise_natural_photos(variant):
    torch.set_num_threads(1)
    model = create_lite(variant).eval()
    with torch.no_grad():
        cat = model(_prep(skimage_data.chelsea())).softmax(-1)[0]
        coffee = model(_prep(skimage_data.coffee())).softmax(-1)[0]
    assert CAT_CLASSES & set(cat.topk(5).indices.tolist())
    assert int(cat.argmax()) in CAT_CLASSES
    assert ESPRESSO in coffee.topk(3).indices.tolist()


def test_untrained_model_does_not_recognise_the_cat():
    """Control for the test above: without the packaged weights the cat is not found."""
    model = create_lite("lite0", pretrained=False).eval()
    with torch.no_grad():
        cat = model(_prep(skimage_data.chelsea())).softmax(-1)[0]
    assert int(cat.argmax()) not in CAT_CLASSES or float(cat.max()) < 0.05


def test_load_imagenet_refuses_mismatched_architecture():
    wrong = create_lite("lite2", pretrained=False)
    with pytest.raises(RuntimeError, match="do not match"):
        load_imagenet(wrong, "lite0")


def test_feature_backbone_shares_the_classifier_weights():
    full = create_lite("lite0")
    feats = create_lite_features("lite0")
    assert torch.equal(full.state_dict()["conv_stem.weight"], feats.state_dict()["conv_stem.weight"])
    outs = feats(torch.zeros(1, 3, 128, 128))
    assert [o.shape[-1] for o in outs] == [32, 16, 8, 4]  # strides 4, 8, 16, 32


def test_classifier_heads_shapes_and_config_round_trip():
    cfg = ClassifierConfig(input_size=96)
    model = LesionClassifier(cfg, pretrained=False).eval()
    mal, sub = model(torch.zeros(2, 3, 96, 96))
    assert mal.shape == (2,) and sub.shape == (2, len(cfg.subtypes))
    assert ClassifierConfig.from_dict(cfg.to_dict()) == cfg


def _normalised(rgb01: torch.Tensor) -> torch.Tensor:
    return (rgb01 - 0.5) / 0.5


def test_shades_of_grey_removes_a_colour_cast_and_keeps_a_grey_photo():
    g = torch.Generator().manual_seed(0)
    scene = torch.rand(1, 3, 32, 32, generator=g) * 0.6 + 0.2
    grey = scene.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    out = shades_of_grey(_normalised(grey), mean, std, 6.0)
    assert torch.allclose(out, _normalised(grey), atol=1e-5)  # a grey photo has a grey illuminant already
    cast = torch.tensor([1.2, 1.0, 0.8]).view(1, 3, 1, 1)  # warm light, same mean brightness
    fixed_plain = shades_of_grey(_normalised(scene), mean, std, 6.0)
    fixed_cast = shades_of_grey(_normalised((scene * cast).clamp(0, 1)), mean, std, 6.0)
    before = (_normalised((scene * cast).clamp(0, 1)) - _normalised(scene)).abs().mean()
    after = (fixed_cast - fixed_plain).abs().mean()
    assert after < 0.05 * before  # the cast is (nearly) undone: only the clipping and the brightness differ


def test_colour_constancy_is_part_of_the_network_and_its_config():
    cfg = ClassifierConfig(input_size=64, color_constancy=6.0)
    model = LesionClassifier(cfg, pretrained=False).eval()
    plain = LesionClassifier(ClassifierConfig(input_size=64), pretrained=False).eval()
    plain.load_state_dict(model.state_dict())  # no parameters of its own: the same weights load either way
    x = _normalised(torch.rand(2, 3, 64, 64) * torch.tensor([1.0, 0.8, 0.5]).view(1, 3, 1, 1))
    with torch.inference_mode():
        assert not torch.allclose(model(x)[0], plain(x)[0])
        assert torch.allclose(model(x)[0], plain(model.preprocess(x))[0], atol=1e-5)
    assert ClassifierConfig.from_dict(cfg.to_dict()).color_constancy == 6.0
    assert ClassifierConfig.from_dict({"variant": "lite0"}).color_constancy == 0.0  # models shipped before it


def test_detector_returns_boxes_in_input_pixels():
    cfg = DetectorConfig(long_side=256)
    model = build_detector(cfg, pretrained=False).eval()
    with torch.no_grad():
        out = model([torch.rand(3, 300, 400)])[0]
    assert set(out) == {"boxes", "scores", "labels"}
    if len(out["boxes"]):
        assert float(out["boxes"][:, 2].max()) <= 400 + 1e-3 and float(out["boxes"][:, 3].max()) <= 300 + 1e-3
    assert DetectorConfig.from_dict(cfg.to_dict()) == cfg
    frozen = [n for n, p in model.backbone.body.named_parameters() if not p.requires_grad]
    assert any(n.startswith("conv_stem") for n in frozen)
