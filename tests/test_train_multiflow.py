"""Tests of stage 3 (`training/train_multiflow.py`): rounds, what each round trains, resume, and the saved model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from medm2g_diffusers import MedM2GPipeline
from medm2g_diffusers.models.multiflow import MedM2GMultiFlowModel
from medm2g_diffusers.single_flow import Condition

from free_port import free_port
from tiny_workspace import build_workspace
from training_scripts import TRAINING, load_training_script

train_ldm = load_training_script("train_ldm")
train_multiflow = load_training_script("train_multiflow")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The tiny workspace with every family's stage-2 denoiser trained for 2 steps."""
    tmp, config = build_workspace(tmp_path_factory.mktemp("multiflow"))
    for family in ("text", "xray", "ct", "mri"):
        train_ldm.main(["--config", str(config), "--family", family, "--output_dir", str(tmp / f"ldm-{family}"),
                        "--max_train_steps", "2", "--set", "ldm.validation_steps=100"])
    return tmp, config


def _run(config, output_dir, *extra):
    return train_multiflow.main(["--config", str(config), "--output_dir", str(output_dir), *extra])


def test_rounds_train_and_save_a_loadable_model(workspace):
    tmp, config = workspace
    result = _run(config, tmp / "run")
    assert [r["round"] for r in result["history"]] == ["text_xray"] * 2 + ["ct_mri"] + ["mri_to_ct"] * 2 + ["mri_synthesis"]
    assert all(np.isfinite(r["loss"]) for r in result["history"])
    assert {"loss_text", "loss_xray"} <= set(result["history"][0])  # L_cross on both sides of a joint round
    model = MedM2GMultiFlowModel.from_pretrained(result["model_dir"])
    assert model.source_slots_of("ct") == ["mri_t1", "mri_t2"] and model.unets["ct"].config.in_channels == 4 * 3 + 2
    assert (tmp / "out" / "multiflow" / "scheduler_config.json").is_file()
    validation = json.loads((tmp / "run" / "validation.json").read_text())
    assert set(validation) == {"text_xray", "ct_mri", "mri_to_ct", "mri_synthesis"}
    for entry in validation.values():
        assert np.isfinite(entry["loss"]["with"]["mean"]) and np.isfinite(entry["loss"]["without"]["mean"])
    for name in validation:
        assert (tmp / "run" / "rounds" / name / "config.json").is_file()
    pipe = MedM2GPipeline.from_pretrained(result["pipeline_dir"])
    pipe.set_progress_bar_config(disable=True)
    out = pipe("Small left pleural effusion.", targets=["xray", "ct"], num_inference_steps=2, output_type="np")
    assert out.images["xray"].shape == (1, 32, 32) and pipe.scheduler.config.prediction_type == "epsilon"


def test_min_snr_rounds_train_and_validate_with_the_plain_loss(workspace):
    """snr_gamma weights the training loss of both kinds of round; each round's validation (plain MSE at fixed
    timesteps, whose scheduler stand-in has no noise table to weight by) still runs and is written."""
    tmp, config = workspace
    result = _run(config, tmp / "run-snr", "--set", "multiflow.snr_gamma=5", "--set", "multiflow.model_name=multiflow_snr",
                  "--set", "multiflow.pipeline_name=pipeline_snr")
    assert all(np.isfinite(r["loss"]) for r in result["history"])
    validation = json.loads((tmp / "run-snr" / "validation.json").read_text())
    assert set(validation) == {"text_xray", "ct_mri", "mri_to_ct", "mri_synthesis"}
    assert all(np.isfinite(entry["loss"]["with"]["mean"]) for entry in validation.values())


def test_each_round_trains_only_its_parts(workspace):
    tmp, config = workspace
    cfg = yaml.safe_load(config.read_text())["multiflow"]
    unets, prediction_type = train_multiflow.load_single_flow(tmp / "out", cfg["families"])
    assert prediction_type == "epsilon"
    model = train_multiflow.build_model(cfg, unets, "concat")
    rounds = train_multiflow.build_rounds(cfg, None)
    ids = lambda params: {id(p) for p in params}  # noqa: E731
    joint = ids(train_multiflow.trainable_for(model, rounds[1]))  # ct-mri with ct frozen
    assert ids(model.context_encoders["mri"].parameters()) <= joint
    assert not ids(model.context_encoders["ct"].parameters()) & joint
    assert not ids(p for n, p in model.unets["mri"].named_parameters() if "processor" not in n) & joint
    translation = ids(train_multiflow.trainable_for(model, rounds[2]))  # mri -> ct: the whole ct denoiser
    assert ids(model.unets["ct"].parameters()) <= translation and not ids(model.unets["mri"].parameters()) & translation


def test_resume_reproduces_the_next_losses(workspace):
    tmp, config = workspace
    full = _run(config, tmp / "full", "--set", "defaults.checkpointing_steps=3")
    (tmp / "killed").mkdir()
    shutil.copytree(tmp / "full" / "checkpoint-3", tmp / "killed" / "checkpoint-3")
    resumed = _run(config, tmp / "killed", "--set", "defaults.checkpointing_steps=3", "--resume_from_checkpoint", "latest")
    np.testing.assert_allclose([r["loss"] for r in resumed["history"]], [r["loss"] for r in full["history"]][3:], rtol=1e-5)


def test_attention_route_trains_v_and_theta_only(workspace):
    tmp, config = workspace
    result = _run(config, tmp / "attention", "--image_conditioning", "attention", "--set", "multiflow.model_name=multiflow_attention")
    model = MedM2GMultiFlowModel.from_pretrained(result["model_dir"])
    assert model.config.source_guidance and model.source_slots_of("ct") == []
    assert model.unets["ct"].config.in_channels == 4


def test_report_round_reads_the_xray_through_theta_c_and_trains_what_it_says(workspace):
    """A translation round into text (report_sources): V_xray(z_0) reaches the text denoiser through θ_c; by default
    V and θ_c train, with train_denoiser the whole text denoiser too; the saved pipeline serves X-ray -> report
    through that route."""
    tmp, config = workspace
    cfg = {**yaml.safe_load(config.read_text())["multiflow"], "report_sources": ["xray"]}
    unets, _ = train_multiflow.load_single_flow(tmp / "out", cfg["families"])
    model = train_multiflow.build_model(cfg, unets, "concat")
    assert model.accepted_sources("text") == ["xray"]
    ids = lambda params: {id(p) for p in params}  # noqa: E731
    report_round = {"name": "xray_to_text", "kind": "translation", "target": "text", "sources": ["xray"], "steps": 1}
    trained = ids(train_multiflow.trainable_for(model, report_round))
    theta = ids(p for n, p in model.unets["text"].named_parameters() if "processor" in n)
    assert ids(model.context_encoders["xray"].parameters()) <= trained and theta <= trained
    assert not ids(p for n, p in model.unets["text"].named_parameters() if "processor" not in n) & trained
    assert not ids(p for n, p in model.unets["xray"].named_parameters() if "processor" not in n) & trained
    whole = ids(train_multiflow.trainable_for(model, {**report_round, "train_denoiser": True}))
    assert ids(model.unets["text"].parameters()) <= whole

    rounds = "[{name: xray_to_text, kind: translation, target: text, sources: [xray], steps: 2, train_denoiser: true}]"
    result = _run(config, tmp / "report-round", "--set", "multiflow.report_sources=[xray]", "--set", f"multiflow.rounds={rounds}",
                  "--set", "multiflow.model_name=multiflow_report", "--set", "multiflow.pipeline_name=pipeline_report")
    assert [r["round"] for r in result["history"]] == ["xray_to_text"] * 2 and all(np.isfinite(r["loss"]) for r in result["history"])
    before = train_multiflow.build_model(cfg, unets, "concat").unets["text"].state_dict()
    after = MedM2GMultiFlowModel.from_pretrained(result["model_dir"])
    assert after.config.report_sources == ["xray"]
    assert not all(torch.equal(before[k], v) for k, v in after.unets["text"].state_dict().items())
    pipe = MedM2GPipeline.from_pretrained(result["pipeline_dir"])
    pipe.set_progress_bar_config(disable=True)
    xray = np.zeros((1, 1, 32, 32), dtype=np.float32)
    out = pipe(conditions={"xray": xray}, targets=["text"], num_inference_steps=2, output_type="latent")
    off = pipe(conditions={"xray": xray}, targets=["text"], num_inference_steps=2, output_type="latent",
               cross_guidance_scale=0.0)
    assert not torch.allclose(out.images["text"], off.images["text"])  # the route is on: θ_c reads V_xray(z_0)


def test_composite_condition_keeps_a_null_token_for_empty_rows():
    tokens = torch.ones(2, 3, 4)
    condition = train_multiflow.composite_condition([(tokens, torch.tensor([[1, 1, 0], [0, 0, 0]])), (tokens[:, :2], torch.tensor([[0, 0], [0, 0]]))])
    assert isinstance(condition, Condition) and condition.tokens.shape == (2, 5, 4)
    assert condition.mask.tolist() == [[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]]
    assert condition.tokens[1].abs().sum() == 0  # the empty row's only unmasked token is zero: the null condition


def test_bad_rounds_are_named():
    with pytest.raises(ValueError, match="kind must be one of"):
        train_multiflow.build_rounds({"rounds": [{"name": "x", "kind": "other", "steps": 1}]}, None)
    with pytest.raises(ValueError, match=r"needs \['target'\]"):
        train_multiflow.build_rounds({"rounds": [{"name": "x", "kind": "translation", "steps": 1}]}, None)


def test_output_dir_inside_a_folder_the_final_save_replaces_is_refused(workspace):
    tmp, config = workspace
    for folder in ("multiflow", "pipeline"):
        with pytest.raises(ValueError, match="must not be"):
            _run(config, tmp / "out" / folder)


# Runs train_multiflow.main in each of two gloo processes; at every checkpoint each rank writes a digest of its
# own copy of the model's parameters, per family, so the test can see whether the ranks still hold one model.
DDP_PROBE = """
import hashlib, json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import train_multiflow
from medm2g_diffusers import training_utils

out = Path(sys.argv[2])
save = train_multiflow.save_checkpoint


def digest_and_save(accelerator, output_dir, step, keep=2):
    model = accelerator.unwrap_model(accelerator._models[0])
    digests = {}
    for name, tensor in sorted(model.state_dict().items()):
        key = name.split(".")[1] if name.startswith(("unets.", "context_encoders.")) else name.split(".")[0]
        digests.setdefault(key, hashlib.sha256()).update(tensor.detach().float().numpy().tobytes())
    (out / f"rank{accelerator.process_index}-step{step}.json").write_text(json.dumps({k: d.hexdigest() for k, d in digests.items()}))
    return save(accelerator, output_dir, step, keep)


train_multiflow.save_checkpoint = digest_and_save
train_multiflow.main(sys.argv[3:])
"""


def test_ddp_keeps_every_rounds_parameters_in_sync(workspace, tmp_path):
    """Two processes draw different rows, so a parameter DDP does not average drifts apart between them. Every
    round trains other parameters; after each round's steps both ranks must still hold bit-identical weights."""
    tmp, config = workspace
    probe = tmp_path / "probe.py"
    probe.write_text(DDP_PROBE)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(TRAINING / "configs" / "accelerate" / "cpu_ddp_gloo.yaml"),
               "--main_process_port", str(free_port()), str(probe), str(TRAINING), str(tmp_path),
               "--config", str(config), "--output_dir", str(tmp_path / "run"), "--set", "defaults.checkpointing_steps=1",
               "--set", "multiflow.model_name=multiflow_ddp", "--set", "multiflow.pipeline_name=pipeline_ddp"]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    steps = sorted({int(p.stem.split("step")[1]) for p in tmp_path.glob("rank0-step*.json")})
    assert steps == list(range(1, 7))  # 6 steps over the four rounds, a digest after each
    for step in steps:
        rank0, rank1 = (json.loads((tmp_path / f"rank{r}-step{step}.json").read_text()) for r in (0, 1))
        assert rank0 == rank1, f"step {step}: the ranks differ in {sorted(k for k in rank0 if rank0[k] != rank1.get(k))}"
