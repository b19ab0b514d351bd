"""Auxiliary diagnosis heads for the binary CNN (issue 15.6): the config, the iddx labels, the loss (rows
without a class ignored; the weight changes the gradients), the resume guard, and that everything that
scores reads the malignancy logit only. Tiny nets (timm's test_resnet), 32-px crops, 24 lesions, 1 epoch."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from helpers import make_cnn_data, tiny_cnn_config
from lesionstack.config import ConfigError, load_config, read_config_dict
from lesionstack.data.dataset import CropDataset
from lesionstack.data.diagnosis import LabelMap, read_iddx_classes
from lesionstack.inference.predictor import Predictor
from lesionstack.models import ModelConfig, build_model
from lesionstack.paths import ArtifactPaths
from lesionstack.resume import ResumeError
from lesionstack.runtime import RunSettings, Runtime, load_weights, predict_logits, sigmoid
from lesionstack.train.aux_heads import AUX_COLUMN, AuxDiagnosisConfig, aux_diagnosis_loss, with_aux_loss
from lesionstack.train.cnn import train_cnn
from lesionstack.train.cnn_config import CNNConfig, load_cnn_config
from lesionstack.train.cnn_scores import scoring_model
from lesionstack.trained.loaders import load_network

CPU = torch.device("cpu")
MEL = "Malignant::Malignant melanocytic proliferations (Melanoma)"
BCC = "Malignant::Malignant adnexal epithelial proliferations - Follicular::Basal cell carcinoma"
SCC = "Malignant::Malignant epidermal proliferations"
LABELS = LabelMap(classes=("benign", "melanoma", "basal cell carcinoma", "squamous cell carcinoma"),
                  mapping={"Benign": "benign", MEL: "melanoma", BCC: "basal cell carcinoma",
                           SCC: "squamous cell carcinoma", "Indeterminate": "drop"})


def write_iddx(root: Path) -> pd.DataFrame:
    """train-metadata.csv for `make_cnn_data`'s lesions: positives melanoma / BCC / SCC in turn (one an
    unmapped "Malignant::Other"), negatives benign, every 5th negative Indeterminate."""
    folds = pd.read_csv(root / "folds.csv")
    malignant = [MEL + "::Melanoma in situ", BCC, SCC + "::Squamous cell carcinoma in situ", "Malignant::Other"]
    iddx = [malignant[(i // 4) % 4] if t else ("Indeterminate::Atypical" if i % 5 == 0 else "Benign")
            for i, t in enumerate(folds["target"])]
    meta = folds[["isic_id", "patient_id", "target"]].assign(iddx_full=iddx, iddx_1=[p.split("::")[0] for p in iddx])
    meta.to_csv(root / "train-metadata.csv", index=False)
    return meta


def aux_config(weight: float = 0.5, **changes: object) -> CNNConfig:
    aux = AuxDiagnosisConfig(weight=weight, labels=LABELS)
    return tiny_cnn_config("train", **{"epochs": 1, "aux_diagnosis": aux, **changes})


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, CNNConfig]:
    root = make_cnn_data(tmp_path_factory.mktemp("aux_data"))
    write_iddx(root)
    out = tmp_path_factory.mktemp("aux_art")
    cfg = aux_config()
    train_cnn(root, root / "folds.csv", cfg, out)
    return root, out, cfg


# ---- config and labels --------------------------------------------------------------------------------


def test_config_section_sets_the_head_width(tmp_path: Path) -> None:
    path = tmp_path / "cnn.yaml"
    path.write_text("aux_diagnosis:\n  weight: 0.2\n  labels:\n    classes: [benign, melanoma]\n"
                    "    mapping: {Benign: benign, Malignant: melanoma, Indeterminate: drop}\n")
    cfg = load_cnn_config(path)
    assert cfg.aux_diagnosis == AuxDiagnosisConfig(0.2, LabelMap(("benign", "melanoma"), {
        "Benign": "benign", "Malignant": "melanoma", "Indeterminate": "drop"}))
    assert cfg.model.aux_outputs == 2
    assert load_cnn_config().aux_diagnosis is None and load_cnn_config().model.aux_outputs == 0
    off = dataclasses.replace(cfg, aux_diagnosis=None)
    assert off.model.aux_outputs == 0 and cfg.model.aux_outputs == 2  # derived, the original untouched
    with pytest.raises(ConfigError, match="aux_diagnosis.weight"):
        load_config(CNNConfig, None, aux_diagnosis={"weight": -1})


def test_iddx_classes_leave_indeterminate_and_unmapped_rows_without_a_class(tmp_path: Path) -> None:
    root = make_cnn_data(tmp_path)
    meta = write_iddx(root)
    y = read_iddx_classes(root / "train-metadata.csv", LABELS)
    assert y.index.tolist() == meta["isic_id"].tolist()
    expected = {"Benign": 0, MEL: 1, BCC: 2, SCC: 3}
    for isic_id, path in zip(meta["isic_id"], meta["iddx_full"]):
        want = next((k for prefix, k in expected.items() if path == prefix or path.startswith(prefix + "::")), -1)
        assert y[isic_id] == want, path
    assert (y == -1).sum() == (meta["iddx_full"].str.startswith("Indeterminate")).sum() + (
        meta["iddx_full"] == "Malignant::Other").sum() > 0


# ---- the loss -----------------------------------------------------------------------------------------


def test_aux_loss_ignores_rows_without_a_class() -> None:
    logits = torch.randn(4, 5, requires_grad=True)
    classes = torch.tensor([2, -1, 0, -1])
    loss = aux_diagnosis_loss(logits, classes, weight=0.5)
    expected = 0.5 * F.cross_entropy(logits[[0, 2], 1:], classes[[0, 2]])
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert logits.grad is not None
    assert torch.all(logits.grad[[1, 3]] == 0) and torch.all(logits.grad[:, 0] == 0)  # no guess, no malignancy
    none = aux_diagnosis_loss(logits, torch.tensor([-1, -1, -1, -1]), weight=0.5)
    assert float(none.detach()) == 0.0


def test_weight_changes_the_gradients_and_zero_is_plain_bce() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(classifier="test_resnet", gate="none", aux_outputs=4))
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([1.0, 0, 0, 1, 0, 0])
    train = pd.DataFrame({"isic_id": [f"ISIC_{i}" for i in range(6)], AUX_COLUMN: [1, 0, -1, 3, 0, 2]})
    index = torch.arange(6)

    def grads(loss_fn) -> list[torch.Tensor]:
        model.zero_grad()
        loss_fn(model(x, aux=True), y, index).backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    def aux_loss(weight: float):
        return with_aux_loss(AuxDiagnosisConfig(weight, LABELS), train, CPU)

    zero, some = grads(aux_loss(0.0)), grads(aux_loss(0.3))
    bce = grads(lambda logits, t, i: F.binary_cross_entropy_with_logits(logits[:, 0], t))
    assert any(not torch.allclose(a, b) for a, b in zip(zero, some))
    assert all(torch.allclose(a, b) for a, b in zip(zero, bce))
    with pytest.raises(ConfigError, match="no 'aux_class' column"):  # e.g. a caller that did not attach them
        with_aux_loss(AuxDiagnosisConfig(), train.drop(columns=AUX_COLUMN), CPU)


def test_forward_returns_the_malignancy_logit_unless_asked_for_all() -> None:
    model = build_model(ModelConfig(classifier="test_resnet", gate="train", segmenter_encoder="test_resnet",
                                    aux_outputs=4)).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        every, main = model(x, aux=True), model(x)
        masked, _ = model.forward_with_mask(x)
    assert every.shape == (3, 5) and main.shape == (3,)
    torch.testing.assert_close(main, every[:, 0])
    torch.testing.assert_close(masked, every[:, 0])
    plain = build_model(ModelConfig(classifier="test_resnet", gate="none"))
    assert plain(x, aux=True).shape == plain(x).shape == (3,)


# ---- the stage ----------------------------------------------------------------------------------------


def head_name(model: torch.nn.Module) -> str:
    head = model.classifier.get_classifier()
    return next(name for name, m in model.classifier.named_modules() if m is head)


def test_fold_model_keeps_its_heads_and_loads_from_its_config(trained: tuple[Path, Path, CNNConfig]) -> None:
    _, out, _ = trained
    files = ArtifactPaths(out).cnn_fold(0)
    saved = read_config_dict(files.config)
    assert saved["model"]["aux_outputs"] == 4 and saved["aux_diagnosis"]["weight"] == 0.5
    model = load_network(saved["model"], files.safetensors, str(files.config))
    assert model.classifier.get_classifier().out_features == 5
    assert load_weights(files.safetensors)[f"classifier.{head_name(model)}.weight"].shape[0] == 5
    assert model(torch.randn(2, 3, 32, 32)).shape == (2,)


class Column0(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, aux=True)[:, 0]


def test_predictor_scores_equal_the_oof_scores_from_logit_0(trained: tuple[Path, Path, CNNConfig]) -> None:
    root, out, cfg = trained
    art = ArtifactPaths(out)
    oof = pd.read_parquet(art.oof_cnn)
    rt = Runtime(RunSettings.pick(cfg), CPU, None)
    for k in (0, 1):
        rows = oof[oof["fold"] == k]
        scored = Predictor.load(out, device="cpu", progress=False, folds=[k]).score_hdf5(
            root / "train-image.hdf5", rows["isic_id"])
        np.testing.assert_allclose(scored["score"], rows["score"], rtol=0, atol=1e-6)
        # by hand: column 0 of all the outputs (the training code's OOF path, with its flip TTA)
        model = scoring_model(cfg, art.cnn_fold(k).safetensors, CPU)
        ds = CropDataset(root / "train-image.hdf5", rows["isic_id"], None, cfg.image_size)
        np.testing.assert_allclose(sigmoid(predict_logits(Column0(model), ds, rt)), rows["score"], rtol=0, atol=1e-6)


def test_changed_aux_config_or_labels_are_refused(trained: tuple[Path, Path, CNNConfig], tmp_path: Path) -> None:
    root, out, cfg = trained
    with pytest.raises(ResumeError, match="aux_diagnosis.weight"):
        train_cnn(root, root / "folds.csv", aux_config(weight=0.1), out)
    with pytest.raises(ResumeError, match="aux_diagnosis"):
        train_cnn(root, root / "folds.csv", dataclasses.replace(cfg, aux_diagnosis=None), out)
    relabelled = tmp_path / "data"
    relabelled.mkdir()
    for name in ("train-image.hdf5", "test-image.hdf5", "folds.csv"):
        (relabelled / name).symlink_to(root / name)
    meta = pd.read_csv(root / "train-metadata.csv")
    meta.loc[meta["iddx_full"] == "Benign", "iddx_full"] = "Indeterminate::Atypical"
    meta.assign(iddx_1=meta["iddx_full"].str.split("::").str[0]).to_csv(relabelled / "train-metadata.csv",
                                                                         index=False)
    with pytest.raises(ResumeError, match="aux_labels"):
        train_cnn(relabelled, relabelled / "folds.csv", cfg, out)


def test_inner_split_training_rows_keep_their_classes(trained: tuple[Path, Path, CNNConfig], tmp_path: Path) -> None:
    root, _, _ = trained  # keep: best_inner trains on part of the other folds: the classes follow the rows
    result = train_cnn(root, root / "folds.csv", aux_config(keep="best_inner", inner_folds=2), tmp_path, folds_only=[0])
    assert result["folds"][0]["n_train"] < (pd.read_csv(root / "folds.csv")["fold"] != 0).sum()
