"""`gate_masks: cached`: the frozen gate's masks made once per crop, warped with their crops in training and
turned with each TTA view in scoring; and the old folders it cannot resume. Tiny nets (timm's test_resnet)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
import pytest
import torch

from helpers import make_cnn_data, tiny_cnn_config
from lesionstack.config import ConfigError
from lesionstack.data.augment import AugmentConfig, PhoneConfig, augment_batch, augment_with_masks
from lesionstack.data.dataset import CropDataset
from lesionstack.models import GatedClassifier, SeedEnsemble, build_model
from lesionstack.paths import ArtifactPaths
from lesionstack.resume import Resume, ResumeError, guard
from lesionstack.runtime import DistContext, RunSettings, Runtime, model_logits, seed_everything
from lesionstack.train.cnn import train_cnn
from lesionstack.train.cnn_config import load_cnn_config
from lesionstack.train.cnn_fold import guard_ignore
from lesionstack.train.gate_masks import CachedMasks, quantise

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[1]
HALF_STEP = 0.5 / 255 + 1e-6  # a cached mask is the segmenter's to the nearest 1/255
# every geometric and colour draw is the identity
IDENTITY = AugmentConfig(hflip=0.0, vflip=0.0, rotate_deg=0.0, scale=(1.0, 1.0), shift=0.0, brightness=0.0,
                         contrast=0.0, saturation=0.0, channel_gain=0.0)


def frozen_model(seed: int = 0) -> GatedClassifier:
    """A frozen gate whose (random) segmenter makes masks that vary across the crop: its head scaled up."""
    seed_everything(seed)
    model = build_model(tiny_cnn_config("freeze").model).eval()
    with torch.no_grad():
        model.segmenter.head.weight.mul_(300.0)
    return model


@pytest.fixture(scope="module")
def crops(tmp_path_factory: pytest.TempPathFactory) -> tuple[CropDataset, Runtime]:
    root = make_cnn_data(tmp_path_factory.mktemp("masks_data"))
    folds = pd.read_csv(root / "folds.csv")
    cfg = tiny_cnn_config("freeze", gate_masks="cached")
    return CropDataset(root / "train-image.hdf5", folds["isic_id"], folds["target"], 32), \
        Runtime(RunSettings.pick(cfg), CPU, None, DistContext())


def plain_batch(dataset: CropDataset, rt: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    index = torch.arange(len(dataset))
    images = torch.stack([torch.from_numpy(dataset.load(i).transpose(2, 0, 1).copy()) for i in range(len(dataset))])
    return index, rt.prepare(images)


def test_cached_masks_are_the_online_masks_under_an_identity_augmentation(crops: tuple[CropDataset, Runtime]) -> None:
    dataset, rt = crops
    model = frozen_model()
    cached = CachedMasks.of(model, dataset, rt)
    index, images = plain_batch(dataset, rt)
    x, mask = augment_with_masks(images, cached.batch(index, images), IDENTITY, torch.Generator().manual_seed(1))
    with torch.no_grad():
        online = model.mask(rt.finish(x))  # what `online` computes in the same training step
    assert cached.masks.shape == (len(dataset), 1, 32, 32) and cached.masks.dtype == torch.uint8
    assert torch.equal(cached.masks, quantise(online))
    assert (mask - online).abs().max() <= HALF_STEP
    assert online.std() > 0.01  # a mask that varies, so the comparisons above can fail


def test_a_flip_or_an_affine_moves_image_and_mask_together_and_colour_only_the_image(
        crops: tuple[CropDataset, Runtime]) -> None:
    dataset, rt = crops
    index, images = plain_batch(dataset, rt)
    mask = CachedMasks.of(frozen_model(), dataset, rt).batch(index, images)
    flip = dataclasses.replace(IDENTITY, hflip=1.0)
    x, m = augment_with_masks(images, mask, flip, torch.Generator().manual_seed(1))
    assert torch.allclose(x, torch.flip(images, dims=[3]), atol=1e-5)
    assert torch.allclose(m, torch.flip(mask, dims=[3]), atol=1e-5)
    # any affine: the mask's warp is the image's warp of the mask
    affine = dataclasses.replace(AugmentConfig(), brightness=0.0, contrast=0.0, saturation=0.0, channel_gain=0.0)
    as_image = mask.expand(-1, 3, -1, -1).contiguous()
    x, m = augment_with_masks(as_image, mask, affine, torch.Generator().manual_seed(2))
    assert not torch.allclose(m, mask, atol=0.05)  # it did move
    assert torch.allclose(x, m.expand(-1, 3, -1, -1), atol=1e-6)
    # colour jitter: the image as augment_batch makes it (the same draws), the mask as without jitter
    x, m = augment_with_masks(images, mask, AugmentConfig(), torch.Generator().manual_seed(3))
    assert torch.equal(x, augment_batch(images, AugmentConfig(), torch.Generator().manual_seed(3)))
    no_colour = dataclasses.replace(AugmentConfig(), brightness=0.0, contrast=0.0, saturation=0.0, channel_gain=0.0)
    assert torch.equal(m, augment_with_masks(images, mask, no_colour, torch.Generator().manual_seed(3))[1])


def test_scoring_makes_one_mask_and_turns_it_with_each_view(crops: tuple[CropDataset, Runtime]) -> None:
    dataset, rt = crops
    members = [frozen_model(0), frozen_model(1)]
    members[1].segmenter.load_state_dict(members[0].segmenter.state_dict())  # one segmenter file, as trained
    ensemble = SeedEnsemble(members).eval()
    _, images = plain_batch(dataset, rt)
    x = rt.finish(images)
    calls = []
    members[0].segmenter.register_forward_hook(lambda *_: calls.append(0))
    members[1].segmenter.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        once = model_logits(ensemble, x, rt, tta=True, one_mask=True)
        assert calls == [0]  # one segmenter pass for two members and two views
        m = members[0].mask(x)
        expected = (ensemble(x, mask=m) + ensemble(torch.flip(x, dims=[3]), mask=torch.flip(m, dims=[3]))) / 2
        assert torch.equal(once, expected)
        online = model_logits(ensemble, x, rt, tta=True)
        assert torch.allclose(once, online, atol=0.5) and not torch.equal(once, online)
        assert torch.equal(ensemble.mask(x), torch.stack([members[0].mask(x), members[1].mask(x)]).mean(0))


def test_training_with_cached_masks_runs_the_segmenter_once_per_crop(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_cnn_data(tmp_path / "data")
    seen: list[int] = []
    mask = GatedClassifier.mask

    def counted(self: GatedClassifier, x: torch.Tensor) -> torch.Tensor | None:
        seen.append(len(x))
        return mask(self, x)

    monkeypatch.setattr(GatedClassifier, "mask", counted)
    cfg = tiny_cnn_config("freeze", gate_masks="cached", epochs=2, val_every=2, tta_hflip=True)
    summary = train_cnn(root, root / "folds.csv", cfg, tmp_path / "art", folds_only=[0])
    n_train, n_val = summary["folds"][0]["n_train"], summary["folds"][0]["n_val"]
    # the training crops once (no step runs the segmenter), then one no-TTA validation pass
    assert sum(seen) == n_train + n_val, seen
    seen.clear()
    train_cnn(root, root / "folds.csv", dataclasses.replace(cfg, gate_masks="online"), tmp_path / "online",
              folds_only=[0])
    assert sum(seen) > 2 * n_train  # online: every augmented crop of every step


def test_an_online_folder_is_refused_by_name_under_cached_masks(tmp_path: Path) -> None:
    root = make_cnn_data(tmp_path / "data", n=16)
    cfg = tiny_cnn_config("freeze", epochs=1)
    train_cnn(root, root / "folds.csv", cfg, tmp_path / "art", folds_only=[0])
    with pytest.raises(ResumeError, match="gate_masks"):
        train_cnn(root, root / "folds.csv", dataclasses.replace(cfg, gate_masks="cached"), tmp_path / "art",
                  folds_only=[0])
    assert (ArtifactPaths(tmp_path / "art").cnn_fold(0).done).is_file()  # left as it was


def test_cached_masks_need_a_frozen_gate_and_no_phone_degradation() -> None:
    with pytest.raises(ConfigError, match="gate_masks"):
        tiny_cnn_config("train", gate_masks="cached")
    phone = dataclasses.replace(AugmentConfig(), phone=PhoneConfig(p=0.5))
    with pytest.raises(ConfigError, match="gate_masks"):
        tiny_cnn_config("freeze", gate_masks="cached", augment=phone)
    assert tiny_cnn_config("none", gate_masks="cached").gate_masks == "cached"  # no mask: nothing to make


def test_a_demo_fold_saved_before_gate_masks_resumes_and_a_cached_one_is_refused_by_name(tmp_path: Path) -> None:
    """Today's configs/cnn/demo.yaml (gate_masks: online) against a finished demo fold folder: one saved by a
    release without the key (read as the default, online) is skipped, as `lesionstack run` resumes an old
    demo/artifacts; one trained with cached masks is refused in one line naming gate_masks."""
    today = load_cnn_config(REPO / "configs" / "cnn" / "demo.yaml")
    assert today.gate_masks == "online"
    inputs = {"folds": "f", "train_images": "i"}
    for name, saved in (("earlier", today), ("cached", dataclasses.replace(today, gate_masks="cached"))):
        files = ArtifactPaths(tmp_path / name).cnn_fold(0)
        guard(files, saved, inputs, ignore=guard_ignore(saved))  # START: writes config.yaml and inputs.json
        if name == "earlier":  # as the earlier release saved it: no such key
            lines = files.config.read_text().splitlines()
            files.config.write_text("".join(f"{line}\n" for line in lines if not line.startswith("gate_masks:")))
        files.done.write_text("best_epoch 16\n")
    assert "gate_masks" not in ArtifactPaths(tmp_path / "earlier").cnn_fold(0).config.read_text()
    earlier = ArtifactPaths(tmp_path / "earlier").cnn_fold(0)
    assert guard(earlier, today, inputs, ignore=guard_ignore(today)) is Resume.SKIP
    with pytest.raises(ResumeError) as refused:
        guard(ArtifactPaths(tmp_path / "cached").cnn_fold(0), today, inputs, ignore=guard_ignore(today))
    assert "gate_masks: saved='cached' now='online'" in str(refused.value) and "\n" not in str(refused.value)
