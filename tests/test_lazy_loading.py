"""Partial loading: `MedM2GPipeline.from_pretrained(..., targets=, conditions=)` and
`MedM2GMultiFlowModel.from_pretrained(..., families=)` load only what a direction needs, give the full load's outputs
bit for bit, and refuse what they did not load. Tiny components from tests/tiny_pipeline.py, saved to a temp dir."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medm2g_diffusers import MedM2GPipeline
from medm2g_diffusers.data.phantoms import PhantomGenerator
from medm2g_diffusers.models import MedM2GMultiFlowModel, multiflow as multiflow_module

from tiny_pipeline import SIZE, get_dummy_components

PROMPT = "Large right pleural effusion. Heart size is normal."
TEXT_TO_XRAY = {"targets": ["xray"], "conditions": ["text"]}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_pipeline")
    MedM2GPipeline(**get_dummy_components()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def full(saved):
    pipe = MedM2GPipeline.from_pretrained(saved)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load(saved, **kwargs):
    pipe = MedM2GPipeline.from_pretrained(saved, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, **kwargs):
    kwargs.setdefault("num_inference_steps", 2)
    return pipe(generator=torch.Generator().manual_seed(0), **kwargs)


def prefixed(keys, prefixes):
    return {key for key in keys if key.startswith(tuple(prefixes))}


# ---------------------------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("output_type", ["latent", "np"])
def test_lazy_text_to_xray_equals_the_full_load_bit_for_bit(saved, full, output_type):
    lazy = load(saved, **TEXT_TO_XRAY)
    expected = run(full, prompt=PROMPT, targets=["xray"], output_type=output_type).images["xray"]
    got = run(lazy, prompt=PROMPT, targets=["xray"], output_type=output_type).images["xray"]
    if output_type == "latent":
        assert torch.equal(got, expected)
    else:
        np.testing.assert_array_equal(got, expected)


def test_lazy_joint_and_image_conditioned_directions_equal_the_full_load(saved, full):
    joint = load(saved, targets=["xray", "ct"], conditions=["text"])  # V of both streams is loaded
    for target in ("xray", "ct"):
        expected = run(full, prompt=PROMPT, targets=["xray", "ct"], output_type="latent").images[target]
        assert torch.equal(run(joint, prompt=PROMPT, targets=["xray", "ct"], output_type="latent").images[target], expected)
    ct = PhantomGenerator(seed=0, size=SIZE).patient(0, anatomy="chest").images["ct"]
    translate = load(saved, targets=["xray"], conditions=["text", "ct"])
    expected = run(full, prompt=PROMPT, conditions={"ct": ct}, targets=["xray"], output_type="latent").images["xray"]
    assert torch.equal(run(translate, prompt=PROMPT, conditions={"ct": ct}, targets=["xray"], output_type="latent").images["xray"], expected)


def test_lazy_image_to_report_loads_the_text_vae_and_matches(saved, full):
    xray = PhantomGenerator(seed=0, size=SIZE).patient(0, anatomy="chest").images["xray"]
    lazy = load(saved, targets=["text"], conditions=["xray"])
    # the text prompt encoder comes too: it chooses among the report candidates
    assert lazy.text_vae is not None and list(lazy.multiflow.unets) == ["text"] and lazy.prompt_encoders.families == ["text", "xray"]
    call = dict(conditions={"xray": xray}, targets=["text"], max_new_tokens=8)
    assert run(lazy, **call).text == run(full, **call).text
    assert run(lazy, report_candidates=1, **call).text == run(full, report_candidates=1, **call).text


def test_lazy_load_in_bfloat16_holds_the_full_loads_values(saved):
    full = MedM2GPipeline.from_pretrained(saved, dtype=torch.bfloat16)
    lazy = MedM2GPipeline.from_pretrained(saved, dtype=torch.bfloat16, **TEXT_TO_XRAY)
    for name in ("multiflow", "prompt_encoders"):
        whole = getattr(full, name).state_dict()
        for key, value in getattr(lazy, name).state_dict().items():
            assert value.dtype == whole[key].dtype and torch.equal(value, whole[key]), key


# ------------------------------------------------------------------------------------- what is in memory


def test_lazy_text_to_xray_holds_only_its_parts(saved, full):
    lazy = load(saved, **TEXT_TO_XRAY)
    full_multiflow = set(full.multiflow.state_dict())
    assert set(lazy.multiflow.state_dict()) == prefixed(full_multiflow, ["unets.xray.", "context_encoders.xray."])
    assert list(lazy.multiflow.unets) == ["xray"] and list(lazy.multiflow.context_encoders) == ["xray"]
    text_parts = ["text_encoder.", "token_projections.text.", "logit_scale"]
    assert set(lazy.prompt_encoders.state_dict()) == prefixed(full.prompt_encoders.state_dict(), text_parts)
    assert lazy.text_vae is None
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert count(lazy.multiflow) == count(full.multiflow.unets["xray"]) + count(full.multiflow.context_encoders["xray"])
    assert count(lazy.multiflow) < count(full.multiflow) / 3  # four denoisers in the full model
    assert lazy.multiflow.is_partial and not full.multiflow.is_partial


def test_only_the_needed_tensors_are_read_from_the_safetensors(saved, monkeypatch):
    read = []
    original = multiflow_module.safe_open

    class Recording:
        def __init__(self, *args, **kwargs):
            self.handle = original(*args, **kwargs)

        def __enter__(self):
            self.inner = self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_tensor(self, name):
            read.append(name)
            return self.inner.get_tensor(name)

    monkeypatch.setattr(multiflow_module, "safe_open", Recording)
    load(saved, **TEXT_TO_XRAY)
    assert read and not [n for n in read if n.startswith(("unets.", "context_encoders.")) and ".xray." not in n]
    assert not [n for n in read if n.startswith(("image_encoders.", "barlow_twins_projectors.", "token_projections.xray"))]


def test_sharded_weights_load_in_part(saved, tmp_path):
    model = MedM2GMultiFlowModel.from_pretrained(saved, subfolder="multiflow")
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    part = MedM2GMultiFlowModel.from_pretrained(tmp_path, families=["xray"])
    whole = model.state_dict()
    assert all(torch.equal(value, whole[key]) for key, value in part.state_dict().items())


def test_an_index_naming_a_file_outside_the_folder_is_refused(saved, tmp_path):
    MedM2GMultiFlowModel.from_pretrained(saved, subfolder="multiflow").save_pretrained(tmp_path, max_shard_size="100KB")
    path = tmp_path / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(path.read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../elsewhere.safetensors"
    path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="outside"):
        MedM2GMultiFlowModel.from_pretrained(tmp_path, families=["xray"])


# ------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "call, match",
    [
        (dict(prompt=PROMPT, targets=["ct"]), r"denoisers of targets \['ct'\].*targets=\['xray', 'ct'\], conditions=\['text'\]"),
        (dict(prompt=PROMPT, targets=["xray", "mri_t1"]), r"denoisers of targets \['mri_t1'\]"),
        (dict(prompt=PROMPT, conditions={"ct": np.zeros((SIZE, SIZE))}, targets=["xray"]),
         r"prompt encoders of conditions \['ct'\].*conditions=\['text', 'ct'\]"),
        (dict(conditions={"xray": np.zeros((SIZE, SIZE))}, targets=["text"]), r"denoisers of targets \['text'\]"),
    ],
)
def test_calls_that_need_unloaded_parts_are_refused_naming_what_to_load(saved, call, match):
    lazy = load(saved, **TEXT_TO_XRAY)
    with pytest.raises(ValueError, match=match):
        run(lazy, **call)


def test_a_partial_pipeline_or_model_is_not_saved(saved, tmp_path):
    with pytest.raises(ValueError, match="load it whole to save it"):
        load(saved, **TEXT_TO_XRAY).save_pretrained(tmp_path / "pipeline")
    model = MedM2GMultiFlowModel.from_pretrained(saved, subfolder="multiflow", families=["xray"])
    with pytest.raises(ValueError, match="load it whole to save it"):
        model.save_pretrained(tmp_path / "model")
    with pytest.raises(ValueError, match="needs the whole model"):
        model.with_source_slots({"xray": ["mri_t1"]})
    assert not (tmp_path / "pipeline").exists() and not (tmp_path / "model").exists()


def test_a_partial_model_refuses_a_stream_it_did_not_load(saved):
    model = MedM2GMultiFlowModel.from_pretrained(saved, subfolder="multiflow", families=["xray"])
    latents = {"xray": torch.zeros(1, 4, 16, 16), "ct": torch.zeros(1, 4, 16, 16)}
    conditions = {key: (torch.zeros(1, 2, 16), None) for key in latents}
    with pytest.raises(ValueError, match=r"the 'ct' context encoder is not loaded.*families=\[\.\.\., 'ct'\]"):
        model(latents, {key: 10 for key in latents}, conditions)
    with pytest.raises(ValueError, match=r"the 'ct' denoiser is not loaded"):
        model({"ct": latents["ct"]}, {"ct": 10}, {"ct": conditions["ct"]})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(targets="xray"), "targets must be a non-empty list"),
        (dict(targets=[]), "targets must be a non-empty list"),
        (dict(targets=["bone"]), "targets must be one of"),
        (dict(conditions=[1]), "conditions must be a non-empty list"),
        (dict(targets=["xray"], variant="fp16"), r"\['variant'\] cannot be combined"),
        (dict(targets=["xray"], multiflow=None), "pass either those components or targets/conditions"),
        (dict(targets=["xray"], dtype=torch.int8), "floating torch.dtype"),
        (dict(targets=["xray"], dtype=torch.float16, torch_dtype=torch.float16), "not both"),
    ],
)
def test_bad_partial_load_arguments_are_refused(saved, kwargs, match):
    with pytest.raises(ValueError, match=match):
        MedM2GPipeline.from_pretrained(saved, **kwargs)


def test_partial_loading_needs_a_local_folder(tmp_path):
    with pytest.raises(ValueError, match="local folder"):
        MedM2GPipeline.from_pretrained("someone/medm2g-base", targets=["xray"])
    with pytest.raises(ValueError, match="local folder"):
        MedM2GMultiFlowModel.from_pretrained(tmp_path / "missing", families=["xray"])


def test_model_level_family_arguments_are_checked(saved):
    with pytest.raises(ValueError, match="distinct families of this checkpoint"):
        MedM2GMultiFlowModel.from_pretrained(saved, subfolder="multiflow", families=["xray", "xray"])
    with pytest.raises(ValueError, match="list of family names"):
        MedM2GMultiFlowModel.from_pretrained(saved, subfolder="multiflow", families="xray")
    with pytest.raises(ValueError, match="source_families needs families"):
        MedM2GMultiFlowModel.from_pretrained(saved, subfolder="multiflow", source_families=["ct"])
    with pytest.raises(ValueError, match="only subfolder, dtype"):
        MedM2GMultiFlowModel.from_pretrained(saved, subfolder="multiflow", families=["xray"], device_map="cpu")
