"""The networks: segmenter shapes, gating modes, parameter groups, local weights, and no network access."""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import yaml

from lesionstack.models import (
    ModelConfig,
    WeightsError,
    build_model,
    build_segmenter,
    load_segmenter,
    normalize_uint8,
    param_groups,
    predict_masks,
    save_segmenter,
    with_segmenter,
)
from lesionstack.models.segmenter import import_timm


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny tensors: a second intra-op thread only spins, which is worse on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection fails the test: weights come from local files only."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("encoder", ["resnet18", "efficientnet_b0", "mobilenetv3_small_100"])
def test_segmenter_shapes_at_odd_sizes(encoder: str) -> None:
    seg = build_segmenter(encoder, decoder_channels=(32, 16, 16, 8, 8)).eval()
    sizes = [(64, 64), (100, 100)] + ([(131, 131), (70, 96)] if encoder == "resnet18" else [])
    with torch.no_grad():
        for h, w in sizes:
            assert seg(torch.randn(1, 3, h, w)).shape == (1, 1, h, w)


def test_segmenter_on_four_stage_encoder() -> None:
    seg = build_segmenter("edgenext_xx_small", decoder_channels=(32, 16, 16, 8, 8)).eval()
    assert len(seg.decoder_channels) == 4  # edgenext has 4 feature stages
    with torch.no_grad():
        assert seg(torch.randn(1, 3, 100, 100)).shape == (1, 1, 100, 100)


@pytest.mark.parametrize(
    ("classifier", "encoder", "gate"),
    [
        ("resnet18", "mobilenetv3_small_100", "train"),
        ("efficientnet_b0", "mobilenetv3_small_100", "freeze"),
        ("mobilenetv3_small_100", "resnet18", "none"),
    ],
)
def test_gated_model_shapes(classifier: str, encoder: str, gate: str) -> None:
    model = build_model(ModelConfig(classifier=classifier, segmenter_encoder=encoder, gate=gate)).eval()
    with torch.no_grad():
        for size in (64, 100):
            logits, mask = model.forward_with_mask(torch.randn(2, 3, size, size))
            assert logits.shape == (2,)
            if gate == "none":
                assert mask is None
            else:
                assert mask.shape == (2, 1, size, size)
                assert float(mask.min()) >= 0.0 and float(mask.max()) <= 1.0
        assert model(torch.randn(1, 3, 64, 64)).shape == (1,)


def test_gating_formula() -> None:
    model = build_model(ModelConfig(**SMALL)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits, m = model.forward_with_mask(x)
        expected = model.classifier(torch.cat([x * (0.5 + 0.5 * m), m], dim=1))[:, 0]
    assert torch.allclose(logits, expected)


def test_gate_none_is_a_plain_timm_classifier() -> None:
    timm = import_timm()
    model = build_model(ModelConfig(classifier="resnet18", gate="none")).eval()
    assert model.segmenter is None
    assert model.classifier.conv1.in_channels == 3
    plain = timm.create_model("resnet18", num_classes=1)
    assert model.classifier.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model.classifier(x)[:, 0])
    assert {g["name"] for g in param_groups(model, 1e-3, 0.01)} == {"classifier", "classifier_no_decay"}


SMALL = {"classifier": "mobilenetv3_small_050", "segmenter_encoder": "mobilenetv3_small_050"}


def _step(model: torch.nn.Module, lr: float = 1e-2) -> None:
    opt = torch.optim.AdamW(param_groups(model, lr, 0.01))
    model.train()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(torch.randn(4, 3, 32, 32)), torch.ones(4))
    loss.backward()
    opt.step()


def test_freeze_keeps_segmenter_weights_and_statistics() -> None:
    model = build_model(ModelConfig(**SMALL, gate="freeze"))
    seg_before = {k: v.clone() for k, v in model.segmenter.state_dict().items()}
    cls_before = model.classifier.conv_stem.weight.clone()
    _step(model)
    assert not model.segmenter.training  # model.train() keeps the frozen part in eval mode
    for key, value in model.segmenter.state_dict().items():
        assert torch.equal(value, seg_before[key]), key  # parameters and BatchNorm buffers alike
    assert not torch.equal(model.classifier.conv_stem.weight, cls_before)
    assert all(not n.startswith("segmenter") for g in param_groups(model, 1e-3, 0.0) for n in [g["name"]])


def test_train_gate_updates_segmenter_at_a_lower_lr() -> None:
    model = build_model(ModelConfig(**SMALL, segmenter_lr_scale=0.25))
    groups = param_groups(model, 1e-3, 0.05)
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs == pytest.approx(
        {"classifier": 1e-3, "classifier_no_decay": 1e-3, "segmenter": 2.5e-4, "segmenter_no_decay": 2.5e-4}
    )
    assert all(g["weight_decay"] == (0.05 if "no_decay" not in g["name"] else 0.0) for g in groups)
    assert all(p.ndim <= 1 for g in groups if "no_decay" in g["name"] for p in g["params"])
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen)) == sum(1 for p in model.parameters() if p.requires_grad)
    seg_ids = {id(p) for p in model.segmenter.parameters()}
    assert all(id(p) in seg_ids for g in groups if g["name"].startswith("segmenter") for p in g["params"])
    before = model.segmenter.encoder.conv_stem.weight.clone()
    _step(model)
    assert not torch.equal(model.segmenter.encoder.conv_stem.weight, before)


def test_model_config_rejects_unknown_gate() -> None:
    with pytest.raises(ValueError, match="gate"):
        ModelConfig(gate="maybe")


def test_small_head_init_starts_a_mobilenet_near_logit_zero() -> None:
    """timm's TF-style init draws a one-logit MobileNet head U(-1, 1): huge first logits; `small` redraws it."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, 64, 64)
    logits = {}
    for init in ("timm", "small"):
        model = build_model(ModelConfig(classifier="mobilenetv3_small_050", gate="none", head_init=init)).train()
        head = model.classifier.get_classifier()
        logits[init] = model(x).detach()
        if init == "small":
            assert head.weight.std() < 0.02 and not head.bias.any()
    assert logits["timm"].std() > 10 * logits["small"].std()
    with pytest.raises(ValueError, match="head_init"):
        ModelConfig(head_init="zeros")


def test_local_timm_weights_load_exactly(tmp_path) -> None:
    timm = import_timm()
    torch.manual_seed(123)
    source = timm.create_model("resnet18")
    file = tmp_path / "resnet18_local.pth"
    torch.save(source.state_dict(), file)
    sd = source.state_dict()

    plain = build_model(ModelConfig(classifier="resnet18", gate="none", classifier_weights=str(file)))
    for key, value in plain.classifier.state_dict().items():
        if not key.startswith("fc."):  # the 1000-class head is dropped for num_classes=1
            assert torch.equal(value, sd[key]), key

    gated = build_model(
        ModelConfig(classifier="resnet18", segmenter_encoder="resnet18", classifier_weights=str(file),
                    segmenter_weights=str(file))
    )
    conv = gated.classifier.conv1.weight
    assert conv.shape[1] == 4
    assert torch.equal(conv[:, :3], sd["conv1.weight"])  # RGB filters kept as they were
    assert torch.count_nonzero(conv[:, 3]) == 0  # the mask channel starts at zero
    assert torch.equal(gated.classifier.layer3[0].conv2.weight, sd["layer3.0.conv2.weight"])
    for key, value in gated.segmenter.encoder.state_dict().items():
        assert torch.equal(value, sd[key]), key


def test_missing_weights_file_is_named(tmp_path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(WeightsError, match="nope.pth"):
        build_model(ModelConfig(gate="none", classifier_weights=str(missing)))


def _save_checkpoint(tmp_path, encoder: str = "resnet18"):
    seg = build_segmenter(encoder, decoder_channels=(32, 16, 16, 8, 8)).eval()
    path = save_segmenter(seg, tmp_path / "segmenter" / "model.pt")
    (path.parent / "config.yaml").write_text(
        yaml.safe_dump({"encoder": encoder, "decoder_channels": [32, 16, 16, 8, 8], "image_size": 64})
    )
    return seg, path


def test_segmenter_checkpoint_round_trip(tmp_path) -> None:
    seg, path = _save_checkpoint(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = seg(x)
        assert torch.equal(load_segmenter(path).eval()(x), expected)
        assert torch.equal(load_segmenter(path.parent).eval()(x), expected)
    model = build_model(
        ModelConfig(classifier="mobilenetv3_small_050", segmenter_encoder="resnet18", segmenter_weights=str(path),
                    gate="freeze")
    )
    with torch.no_grad():
        assert torch.allclose(model.mask(x), torch.sigmoid(expected))
    with pytest.raises(WeightsError, match="encoder 'resnet18'"):
        build_model(ModelConfig(segmenter_encoder="efficientnet_b0", segmenter_weights=str(path)))


def test_fold_model_rebuilds_without_the_segmenter_file(tmp_path) -> None:
    """Kaggle has the fold weights but not train-seg's folder: the CNN config must carry the decoder widths."""
    _, path = _save_checkpoint(tmp_path)
    cfg = with_segmenter(ModelConfig(classifier="mobilenetv3_small_050", segmenter_encoder="resnet18"), path)
    assert cfg.segmenter_decoder_channels == (32, 16, 16, 8, 8)  # from the checkpoint's config.yaml
    with pytest.raises(WeightsError, match="decoder_channels"):
        build_model(dataclasses.replace(cfg, segmenter_decoder_channels=(16, 16, 16, 8, 8)))
    trained = build_model(cfg).state_dict()
    path.unlink()
    rebuilt = build_model(dataclasses.replace(cfg, segmenter_weights=None))
    rebuilt.load_state_dict(trained)  # same shapes: strict loading raises on any mismatch
    default = build_model(dataclasses.replace(cfg, segmenter_weights=None, segmenter_decoder_channels=None))
    with pytest.raises(RuntimeError, match="size mismatch"):
        default.load_state_dict(trained)  # what the config used to rebuild without the recorded widths


def test_checkpoint_without_config_is_refused(tmp_path) -> None:
    _, path = _save_checkpoint(tmp_path)
    (path.parent / "config.yaml").unlink()
    with pytest.raises(WeightsError, match="config.yaml"):
        load_segmenter(path)


def test_predict_masks_on_uint8_images() -> None:
    seg = build_segmenter("resnet18", decoder_channels=(32, 16, 16, 8, 8))
    seg.train()
    rng = np.random.default_rng(0)
    masks = predict_masks(seg, rng.integers(0, 256, (3, 40, 40, 3), dtype=np.uint8))
    assert masks.shape == (3, 40, 40) and masks.dtype == np.float32
    assert 0.0 <= masks.min() and masks.max() <= 1.0
    assert seg.training  # the caller's mode is restored
    ragged = predict_masks(seg, [rng.integers(0, 256, (s, s, 3), dtype=np.uint8) for s in (30, 45)])
    assert [m.shape for m in ragged] == [(30, 30), (45, 45)]


def test_predict_masks_runs_at_the_trained_scale(tmp_path) -> None:
    _, path = _save_checkpoint(tmp_path)  # its config says image_size: 64
    seg = load_segmenter(path)
    assert seg.image_size == 64
    image = np.random.default_rng(0).integers(0, 256, (1, 128, 128, 3), dtype=np.uint8)
    mask = predict_masks(seg, image)
    assert mask.shape == (1, 128, 128)
    small = torch.nn.functional.interpolate(normalize_uint8(image), size=(64, 64), mode="bilinear",
                                            align_corners=False, antialias=True)
    with torch.no_grad():
        logits = torch.nn.functional.interpolate(seg.eval()(small), size=(128, 128), mode="bilinear",
                                                 align_corners=False)
    assert np.allclose(mask, torch.sigmoid(logits)[:, 0].numpy(), atol=1e-5)
    assert not np.allclose(mask, predict_masks(seg, image, size=128), atol=1e-3)  # native scale differs


def test_importing_models_does_not_import_timm() -> None:
    code = "import sys, lesionstack.models; assert 'timm' not in sys.modules, 'timm imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
