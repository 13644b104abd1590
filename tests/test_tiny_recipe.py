"""`training/recipes/tiny.sh` end to end on a 40-patient phantom set with every stage cut to a few steps: the lanes
run, every stage finds what the previous ones wrote, the recipe leaves a loadable pipeline, and a failing lane
stops the other from waiting on it (slow: ~3 min)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from medm2g_diffusers import MedM2GPipeline
from medm2g_diffusers.data.datasets import build_phantom_dataset

REPO = Path(__file__).resolve().parents[1]


def few_step_config(tmp: Path, **alignment) -> Path:
    """tiny.yaml with the data, output root and every stage's budget made tiny (the models' shapes unchanged)."""
    config = yaml.safe_load((REPO / "training" / "configs" / "tiny.yaml").read_text())
    config["output_root"] = str(tmp / "out")
    config["data"].update(dataset=str(tmp / "data"), report_corpus=None)
    config["defaults"]["checkpointing_steps"] = 2
    few = {"max_train_steps": 2, "validation_steps": 2, "lr_warmup_steps": 1}
    config["image_vae"].update(few, batch_size=4, num_validation_images=4, scaling_factor_samples=8)
    config["text_vae"].update(few, batch_size=4, num_validation_reports=4, scaling_factor_samples=8, max_new_tokens=8)
    config["alignment"].update(train_batch_size=8, vi_batch_size=4, validation_max_samples=16, lr_warmup_steps=1)
    for round_ in config["alignment"]["rounds"]:
        round_["steps"] = 1
    config["alignment"].update(alignment)
    config["ldm"].update(few, train_batch_size=4, num_validation_samples=2, validation_inference_steps=2)
    config["ldm"]["families"]["text"].update(max_train_steps=2, train_batch_size=4)
    config["multiflow"].update(train_batch_size=4, num_validation_rows=4, lr_warmup_steps=1)
    for round_ in config["multiflow"]["rounds"]:
        round_["steps"] = 1
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_recipe(tmp: Path, config: Path) -> subprocess.CompletedProcess:
    build_phantom_dataset(40, seed=0, size=64).save_to_disk(str(tmp / "data"))
    env = dict(os.environ, CONFIG=str(config), PY=sys.executable, THREADS="1")
    return subprocess.run(["bash", str(REPO / "training" / "recipes" / "tiny.sh")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.mark.slow
def test_tiny_recipe_runs_every_stage_in_its_lane_and_writes_a_pipeline(tmp_path):
    done = run_recipe(tmp_path, few_step_config(tmp_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    log = (tmp_path / "out" / "recipe_times.log").read_text()
    assert log.count("lanes lane1 | lane2") == 1 and "recipe took" in log
    # each lane's hand-off came before the stage that needed it
    order = [line.split(" took ")[0] for line in log.splitlines()]
    assert order.index(next(s for s in order if "train_alignment.py" in s)) < order.index(next(s for s in order if "--family xray" in s))
    assert order.index(next(s for s in order if "--component vae" in s)) < order.index(next(s for s in order if "--family mri" in s))
    assert order.index(next(s for s in order if "--component vae" in s)) < order.index(next(s for s in order if "--family ct" in s))
    assert order.index(next(s for s in order if "--component text_vae" in s)) < order.index(next(s for s in order if "--family text" in s))
    for name in ("tokenizer", "vae", "text_vae", "prompt_encoders", "unet_xray", "unet_ct", "unet_mri", "unet_text", "pipeline"):
        assert (tmp_path / "out" / name).is_dir(), name
    pipe = MedM2GPipeline.from_pretrained(str(tmp_path / "out" / "pipeline"))
    assert set(pipe.supported_targets()) >= {"text", "xray", "ct", "mri_t1"}


@pytest.mark.slow
def test_a_failing_lane_stops_the_recipe_instead_of_leaving_the_other_lane_waiting(tmp_path):
    # alignment (lane 2) fails at once; lane 1 trains the image VAE, then must give up waiting for the prompt encoders
    config = few_step_config(tmp_path, rounds=[{"name": "hub", "pairs": [["text", "no_such_family"]], "trainable": ["text"], "steps": 1}])
    done = run_recipe(tmp_path, config)
    assert done.returncode != 0
    assert "the other lane failed; not waiting for alignment" in done.stderr
    assert (tmp_path / "out" / "vae").is_dir() and not (tmp_path / "out" / "unet_xray").exists()
    assert "recipe took" not in (tmp_path / "out" / "recipe_times.log").read_text()
