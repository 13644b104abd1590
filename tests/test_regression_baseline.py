"""The image -> image regression baseline: `MedM2GRegressionPipeline` and `training/train_regression_baseline.py`.

Also home of the tiny *real-like* dataset (the canonical layout as ``medm2g prepare`` writes real sets: anatomy and
findings None, slices without reports) that tests/test_evaluate.py scores on.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import yaml
from datasets import Dataset, DatasetDict
from diffusers import UNet2DModel

from medm2g_diffusers import MedM2GRegressionPipeline
from medm2g_diffusers.checkpoints import UnsafeCheckpointError
from medm2g_diffusers.cli import load_pipeline
from medm2g_diffusers.data.datasets import canonical_features, save_dataset
from medm2g_diffusers.data.io import read_provenance
from medm2g_diffusers.data.phantoms import PhantomGenerator

from training_scripts import load_training_script

SIZE = 32
train_regression = load_training_script("train_regression_baseline")


def real_like_dataset(counts: dict[str, int], seed: int = 0) -> DatasetDict:
    """``counts``: split -> patients. Chest patients give an X-ray with its report (as covid_cxr); head patients
    give CT, T1, T2, FLAIR and a T1c (T1 with a bright rim: a stand-in for contrast uptake), no report (as the
    Harvard and BraTS slices). ``anatomy`` and ``findings`` are None everywhere."""
    generator = PhantomGenerator(seed=seed, size=SIZE)
    features = canonical_features(SIZE)
    splits, index = {}, 0
    for split, n in counts.items():
        rows = []
        for _ in range(n):
            patient = generator.patient(index)
            row = {key: None for key in features}
            row["patient_id"] = f"real-{index:03d}"
            if patient.anatomy == "chest":
                row["xray"], row["report"] = patient.images["xray"], patient.report
            else:
                for key in ("ct", "mri_t1", "mri_t2", "mri_flair"):
                    row[key] = patient.images[key]
                t1 = patient.images["mri_t1"]
                row["mri_t1c"] = t1 + (t1 > np.percentile(t1, 90)) * t1.max()
            rows.append(row)
            index += 1
        splits[split] = Dataset.from_dict({col: [row[col] for row in rows] for col in features}, features=features)
    return DatasetDict(splits)


def tiny_regression_pipeline(sources: list[str], target: str, size: int = SIZE) -> MedM2GRegressionPipeline:
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=size, in_channels=len(sources), out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, norm_num_groups=4)
    return MedM2GRegressionPipeline(unet=unet, sources=sources, target=target)


# -------------------------------------------------------------------------------------------- pipeline


@pytest.fixture(scope="module")
def pipe():
    return tiny_regression_pipeline(["mri_t1", "mri_t2"], "mri_flair")


def _sources(batch: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {key: rng.uniform(0, 500, (batch, 1, SIZE, SIZE)).astype(np.float32) for key in ("mri_t1", "mri_t2")}


def test_scoring_interface(pipe):
    assert pipe.supported_targets() == ["mri_flair"] and pipe.image_size == SIZE and pipe.tokenizer is None
    assert pipe.accepted_conditions("mri_flair") == ["mri_t1", "mri_t2"] and pipe.accepted_conditions("ct") == []
    with pytest.raises(ValueError, match="target must be one of"):
        pipe.accepted_conditions("pet")


def test_outputs_shapes_ranges_and_provenance(pipe):
    conditions = _sources()
    out = pipe(conditions=conditions, targets=["mri_flair"], output_type="np")
    images = out.images["mri_flair"]
    assert images.shape == (3, SIZE, SIZE) and images.dtype == np.float32
    assert 0.0 <= images.min() and images.max() <= 1.0 and images.std() > 0
    assert out.text is None
    record = out.provenance["mri_flair"]
    assert record["synthetic"] is True and record["model_class"] == "MedM2GRegressionPipeline"
    assert record["task"] == "mri_t1+mri_t2 -> mri_flair" and record["num_inference_steps"] is None
    tensor = pipe(conditions=conditions, output_type="pt").images["mri_flair"]
    assert tensor.shape == (3, 1, SIZE, SIZE)
    np.testing.assert_array_equal(tensor[:, 0].numpy(), images)
    # Steps, guidance and generators are ignored on purpose: the model is deterministic.
    again = pipe(conditions=conditions, targets=["mri_flair"], output_type="np", num_inference_steps=3, guidance_scale=7.0,
                 generator=[torch.Generator().manual_seed(i) for i in range(3)], max_text_tokens=10).images["mri_flair"]
    np.testing.assert_array_equal(again, images)
    # Each sample depends on its own sources only (no batch coupling).
    one = pipe(conditions={k: v[1] for k, v in conditions.items()}, output_type="np").images["mri_flair"]
    np.testing.assert_allclose(one[0], images[1], atol=1e-5)


def test_pil_outputs_are_tagged_synthetic(pipe, tmp_path):
    image = pipe(conditions=_sources(1)).images["mri_flair"][0]
    assert isinstance(image, PIL.Image.Image) and image.mode == "L" and image.size == (SIZE, SIZE)
    image.save(tmp_path / "flair.png")
    record = read_provenance(tmp_path / "flair.png")
    assert record["synthetic"] is True and record["modality"] == "mri_flair" and record["model"] == "MedM2GRegressionPipeline"


def test_bad_inputs_are_refused(pipe):
    conditions = _sources()
    with pytest.raises(ValueError, match=r"conditions lacks \['mri_t2'\]"):
        pipe(conditions={"mri_t1": conditions["mri_t1"]})
    with pytest.raises(ValueError, match=r"cannot condition 'mri_flair' on \['mri_pd'\]"):
        pipe(conditions={**conditions, "mri_pd": conditions["mri_t1"]})
    with pytest.raises(ValueError, match=r"targets must be \['mri_flair'\]"):
        pipe(conditions=conditions, targets=["ct"])
    with pytest.raises(ValueError, match="prompt must be None"):
        pipe(prompt="Edema.", conditions=conditions)
    with pytest.raises(ValueError, match=f"must be {SIZE}x{SIZE}"):
        pipe(conditions={k: v[..., :16, :16] for k, v in conditions.items()})
    with pytest.raises(ValueError, match="must have shape"):
        pipe(conditions={k: v[:, :, None] for k, v in conditions.items()})
    with pytest.raises(ValueError, match="same batch size"):
        pipe(conditions={"mri_t1": conditions["mri_t1"], "mri_t2": conditions["mri_t2"][:2]})
    with pytest.raises(ValueError, match="num_images_per_prompt must be 1"):
        pipe(conditions=conditions, num_images_per_prompt=2)
    with pytest.raises(ValueError, match="output_type must be one of"):
        pipe(conditions=conditions, output_type="latent")
    with pytest.raises(ValueError, match="in_channels=2"):
        MedM2GRegressionPipeline(unet=pipe.unet, sources=["mri_t1"], target="mri_flair")
    with pytest.raises(ValueError, match="must not include the target"):
        MedM2GRegressionPipeline(unet=pipe.unet, sources=["mri_t1", "mri_flair"], target="mri_flair")
    with pytest.raises(ValueError, match="image modality keys"):
        MedM2GRegressionPipeline(unet=pipe.unet, sources=["mri_t1", "text"], target="mri_flair")


def test_save_load_round_trip_is_bit_exact(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "reg")
    assert sorted(p.name for p in (tmp_path / "reg" / "unet").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    index = json.loads((tmp_path / "reg" / "model_index.json").read_text())
    assert index["_class_name"] == "MedM2GRegressionPipeline" and index["sources"] == ["mri_t1", "mri_t2"] and index["target"] == "mri_flair"
    loaded = load_pipeline(str(tmp_path / "reg"))  # the CLI's loader dispatches on model_index.json
    assert isinstance(loaded, MedM2GRegressionPipeline) and loaded.sources == pipe.sources and loaded.image_size == SIZE
    for (name, a), (_, b) in zip(pipe.unet.state_dict().items(), loaded.unet.state_dict().items()):
        assert torch.equal(a, b), name
    conditions = _sources()
    np.testing.assert_array_equal(loaded(conditions=conditions, output_type="np").images["mri_flair"],
                                  pipe(conditions=conditions, output_type="np").images["mri_flair"])
    assert loaded(conditions=conditions, output_type="np").provenance["mri_flair"]["model"] == str(tmp_path / "reg")


def test_pickle_weights_are_refused(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "reg")
    torch.save({}, tmp_path / "reg" / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError, match="pickle"):
        load_pipeline(str(tmp_path / "reg"))


# -------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("regression")
    save_dataset(real_like_dataset({"train": 10, "validation": 4, "test": 0}), tmp / "data")  # as `medm2g prepare` saves
    config = {
        "defaults": {"seed": 0, "mixed_precision": "no", "checkpointing_steps": 2, "checkpoints_total_limit": 3},
        "output_root": str(tmp / "runs"),
        "regression": {
            "adam_beta1": 0.5, "adam_beta2": 0.999, "lr_scheduler": "cosine", "lr_warmup_steps": 1, "max_grad_norm": 1.0,
            "augment": {"max_rotation_deg": 8, "max_shift": 0.05, "scale": [0.93, 1.07]},
            "validation_steps": 2, "num_validation_rows": 8, "validation_batch_size": 4,
            "unet": {"block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4},
        },
        "tasks": {
            "mri_to_ct": {"dataset": str(tmp / "data"), "sources": ["mri_t2"], "target": "ct",
                          "max_train_steps": 3, "train_batch_size": 4, "learning_rate": 1e-3, "seed": 0},
        },
    }
    path = tmp / "regression.yaml"
    path.write_text(yaml.safe_dump(config))
    return tmp, path


def _train(config: Path, *extra: str) -> dict:
    return train_regression.main(["--config", str(config), "--task", "mri_to_ct", *extra])


def test_smoke_run_writes_a_pipeline_validation_and_budget(workspace):
    tmp, config = workspace
    result = _train(config, "--output_dir", str(tmp / "smoke"))
    assert [r["step"] for r in result["history"]] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in result["history"])
    assert sorted(result["validation"]) == ["2", "3"] and result["validation"]["3"]["n"] > 0
    assert json.loads((tmp / "smoke" / "validation.json").read_text())["3"]["psnr_mean"] == result["validation"]["3"]["psnr_mean"]
    budget = json.loads((tmp / "smoke" / "budget.json").read_text())
    assert budget["steps"] == 3 and budget["train_batch_size"] == 4 and budget["samples_seen"] == 12
    assert budget["train_seconds"] > 0 and budget["training_pairs"] > 0 and budget["parameters"] > 0
    pipe = load_pipeline(result["model_dir"])
    assert Path(result["model_dir"]) == tmp / "runs" / "mri_to_ct" / "regression"
    assert isinstance(pipe, MedM2GRegressionPipeline) and pipe.sources == ["mri_t2"] and pipe.target == "ct"
    assert pipe.image_size == SIZE and list(pipe.unet.config.block_out_channels) == [8, 16]


def test_resume_reproduces_the_next_loss(workspace):
    """A run killed after its step-2 checkpoint and resumed sees the uninterrupted run's step-3 loss."""
    tmp, config = workspace
    full = _train(config, "--output_dir", str(tmp / "full"))
    (tmp / "killed").mkdir()
    shutil.copytree(tmp / "full" / "checkpoint-2", tmp / "killed" / "checkpoint-2")
    resumed = _train(config, "--output_dir", str(tmp / "killed"), "--resume_from_checkpoint", "latest")
    assert resumed["start_step"] == 2 and [r["step"] for r in resumed["history"]] == [3]
    np.testing.assert_allclose(resumed["history"][0]["loss"], full["history"][2]["loss"], rtol=1e-6)
    assert full["history"][2]["loss"] != full["history"][1]["loss"]


def test_augmentation_keeps_pairs_registered_and_is_seeded():
    pairs = torch.zeros((2, 2, SIZE, SIZE)) - 1
    pairs[:, :, 8:24, 10:20] = 1.0  # the same square in "source" and "target"
    cfg = {"max_rotation_deg": 8, "max_shift": 0.1, "scale": [0.9, 1.1]}
    generator = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    out = train_regression.augment(pairs, cfg, generator())
    assert torch.equal(out, train_regression.augment(pairs, cfg, generator()))
    assert torch.allclose(out[:, 0], out[:, 1]) and not torch.allclose(out, pairs)
    assert out.min() >= -1 - 1e-6 and out.max() <= 1 + 1e-6 and torch.isclose(out[:, :, 0, 0], torch.tensor(-1.0)).all()


def test_unknown_task_and_missing_keys_are_named(workspace, tmp_path):
    _, config = workspace
    with pytest.raises(ValueError, match=r"--task must be one of the config's tasks \['mri_to_ct'\]"):
        train_regression.main(["--config", str(config), "--task", "nope"])
    data = yaml.safe_load(config.read_text())
    del data["tasks"]["mri_to_ct"]["learning_rate"]
    other = tmp_path / "c.yaml"
    other.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match=r"needs \['learning_rate'\]"):
        train_regression.main(["--config", str(other), "--task", "mri_to_ct"])


def test_the_shipped_config_has_the_three_tasks_at_the_shared_budget():
    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "training" / "configs" / "regression.yaml").read_text())
    tasks = {name: train_regression.task_config(config, name) for name in config["tasks"]}
    assert sorted(tasks) == ["brats_t1_t1c_t2_to_flair", "brats_t1_t2_to_flair", "harvard_mri_to_ct"]
    assert tasks["brats_t1_t1c_t2_to_flair"]["sources"] == ["mri_t1", "mri_t1c", "mri_t2"]
    assert all(t["max_train_steps"] == 1500 and t["train_batch_size"] == 16 for t in tasks.values())
    unet = train_regression.build_unet(tasks["harvard_mri_to_ct"], 1, 64)
    assert 0.7e6 < sum(p.numel() for p in unet.parameters()) < 1.5e6
    assert not any("Attn" in type(m).__name__ for m in unet.modules())
