"""The committed medm2g-tiny checkpoint: found by name, small enough, and it generates offline."""

import json

import numpy as np
import PIL.Image
import pytest
import torch

from medm2g_diffusers import MedM2GPipeline
from medm2g_diffusers.checkpoints import BUNDLED_CHECKPOINTS, bundled_checkpoint_path, resolve_checkpoint
from medm2g_diffusers.cli import main


@pytest.fixture(scope="module")
def pipe():
    pipe = MedM2GPipeline.from_pretrained("medm2g-tiny")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_bundled_checkpoint_is_committed_small_and_safetensors_only():
    folder = bundled_checkpoint_path("medm2g-tiny")
    files = [f for f in folder.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 60e6
    weights = [f for f in files if f.suffix in {".safetensors", ".bin", ".pt", ".pth", ".ckpt"}]
    assert weights and all(f.suffix == ".safetensors" for f in weights)
    assert set(json.loads((folder / "model_index.json").read_text())) >= {"multiflow", "vae", "text_vae", "prompt_encoders", "tokenizer", "scheduler"}


def test_names_resolve_and_unknown_names_are_rejected(tmp_path):
    assert resolve_checkpoint("medm2g-tiny") == str(BUNDLED_CHECKPOINTS["medm2g-tiny"])
    assert resolve_checkpoint(str(tmp_path)) == str(tmp_path)  # a folder is itself
    with pytest.raises(ValueError, match="bundled checkpoints"):
        bundled_checkpoint_path("medm2g-huge")


def test_loads_by_name_as_fp32_and_generates_every_direction(pipe):
    assert next(pipe.multiflow.parameters()).dtype == torch.float32  # stored fp16, computed fp32
    assert set(pipe.supported_targets()) >= {"text", "xray", "ct", "mri_t1"}
    out = pipe("Large left pleural effusion.", targets=["xray", "ct"], num_inference_steps=3,
               generator=torch.Generator().manual_seed(0), output_type="np")
    for target in ("xray", "ct"):
        image = out.images[target]
        assert image.shape == (1, pipe.image_size, pipe.image_size) and np.isfinite(image).all()
        assert image.std() > 0.02  # not a blank
        assert out.provenance[target]["model"] == "medm2g-tiny"  # the name, not a local path
    report = pipe(conditions={"xray": out.images["xray"]}, targets=["text"], num_inference_steps=3,
                  generator=torch.Generator().manual_seed(0)).text[0]
    assert "findings" in report.lower() and len(report.split()) > 5
    ct = pipe(conditions={"mri_t1": np.random.default_rng(0).random((pipe.image_size,) * 2)}, targets=["ct"],
              num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np", ct_in_hu=True)
    assert -1000.0 <= ct.images["ct"].min() and ct.images["ct"].max() <= 1000.0


def test_cli_uses_the_bundled_checkpoint_by_default(tmp_path):
    code = main(["generate", "--prompt", "Small right pneumothorax.", "--targets", "xray", "--steps", "2",
                 "--out", str(tmp_path)])
    assert code == 0
    image = PIL.Image.open(tmp_path / "xray_0.png")
    assert image.text["medm2g:model"] == "medm2g-tiny" and image.text["medm2g:synthetic"] == "true"


def test_a_text_only_partial_load_drops_the_ct_encoders_windows():
    """The bundled prompt encoders read CT through windows; loading only the text encoder must not trip on them."""
    from medm2g_diffusers import MedM2GPipeline

    pipe = MedM2GPipeline.from_pretrained("medm2g-tiny", targets=["xray"], conditions=["text"])
    assert pipe.prompt_encoders.config.families == ["text"] and not pipe.prompt_encoders.config.input_windows
    pipe = MedM2GPipeline.from_pretrained("medm2g-tiny", targets=["xray"], conditions=["ct"])
    assert pipe.prompt_encoders.config.input_windows == {"ct": [[-0.02, 0.1], [-0.16, 0.24]]}
