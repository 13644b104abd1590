"""Tests of `MedM2GPipeline` in the diffusers manner: tiny components built in code, 2 inference steps."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from medm2g_diffusers import MedM2GPipeline, MedM2GPipelineOutput
from medm2g_diffusers.data.io import read_provenance
from medm2g_diffusers.data.phantoms import PhantomGenerator
from medm2g_diffusers.models import MedM2GMultiFlowModel

from tiny_pipeline import SIZE, SLOTS, get_dummy_components, get_dummy_pipeline

PROMPT = "Large right pleural effusion. Heart size is normal."


@pytest.fixture(scope="module")
def phantom():
    return PhantomGenerator(seed=0, size=SIZE).patient(0, anatomy="chest")


@pytest.fixture(scope="module")
def pipe():
    return get_dummy_pipeline()


def run(pipe, **kwargs):
    kwargs.setdefault("num_inference_steps", 2)
    kwargs.setdefault("generator", torch.Generator().manual_seed(0))
    return pipe(**kwargs)


# ------------------------------------------------------------------------------------------ directions


def test_text_to_image_matches_recorded_slice(pipe):
    out = run(pipe, prompt=PROMPT, targets=["xray"], output_type="np")
    image = out.images["xray"]
    assert isinstance(out, MedM2GPipelineOutput) and image.shape == (1, SIZE, SIZE) and out.text is None
    assert 0.0 <= image.min() and image.max() <= 1.0
    expected = np.array(RECORDED["text_to_xray"], dtype=np.float32)
    np.testing.assert_allclose(image[0, 10, 10:16], expected, atol=1e-3)


def test_joint_generation_couples_the_targets(pipe):
    joint = run(pipe, prompt=PROMPT, targets=["xray", "ct", "mri_t1"], output_type="latent")
    alone = run(pipe, prompt=PROMPT, targets=["xray"], output_type="latent")
    assert set(joint.images) == {"xray", "ct", "mri_t1"}
    # Same seed and noise for xray, but in the joint run it also attends to V of the CT and MRI streams.
    uncoupled = run(pipe, prompt=PROMPT, targets=["xray", "ct", "mri_t1"], output_type="latent", cross_guidance_scale=0.0)
    assert not torch.allclose(joint.images["xray"], uncoupled.images["xray"])
    assert torch.allclose(alone.images["xray"], uncoupled.images["xray"], atol=1e-5)


def test_image_to_text(pipe, phantom):
    out = run(pipe, conditions={"xray": phantom.images["xray"]}, targets=["text"], max_new_tokens=8)
    assert isinstance(out.text, list) and len(out.text) == 1 and isinstance(out.text[0], str)
    assert out.images == {}
    assert out.provenance["text"]["report_candidates"] == 16  # the default when a report is the only target


def test_report_candidates_return_each_samples_consensus_candidate(pipe, phantom):
    xray = {"xray": np.stack([phantom.images["xray"]] * 2)[:, None]}
    call = dict(conditions=xray, targets=["text"], max_new_tokens=8)
    # Two samples with four candidates each draw the same noise as eight samples of one candidate.
    every = run(pipe, num_images_per_prompt=4, report_candidates=1, **call)
    chosen = pipe.choose_reports(every.text, 4)
    out = run(pipe, report_candidates=4, **call)
    assert out.text == [every.text[i] for i in chosen] and out.provenance["text"]["report_candidates"] == 4
    latents = run(pipe, num_images_per_prompt=4, report_candidates=1, output_type="latent", **call).images["text"]
    picked = run(pipe, report_candidates=4, output_type="latent", **call)
    assert torch.equal(picked.images["text"], latents[chosen]) and picked.text is None
    # One generator per sample: a sample's candidates come from its own generator, whatever the batch.
    alone = run(pipe, conditions={"xray": phantom.images["xray"]}, targets=["text"], max_new_tokens=8, report_candidates=4,
                generator=[torch.Generator().manual_seed(5)])
    pair = run(pipe, report_candidates=4, generator=[torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)], **call)
    assert alone.text[0] == pair.text[0]


def test_choose_reports_keeps_the_report_the_others_agree_with(pipe):
    reports = ["large right pleural effusion", "the heart is enlarged", "large right pleural effusion",
               "no pneumothorax", "no pneumothorax", "small nodule"]
    # each sample's duplicated report is its consensus; a tie goes to the earlier one
    assert pipe.choose_reports(reports, 3).tolist() == [0, 3]
    with pytest.raises(ValueError, match="reports per sample"):
        pipe.choose_reports(reports, 4)


def test_report_candidates_default_to_one_when_the_call_fixes_the_noise_or_has_no_report(pipe, phantom):
    xray = {"xray": phantom.images["xray"]}
    noise = torch.randn(1, pipe.text_vae.config.text_latent_dim, 1, 1, generator=torch.Generator().manual_seed(1))
    fixed = run(pipe, conditions=xray, targets=["text"], latents={"text": noise}, max_new_tokens=8)
    assert fixed.provenance["text"]["report_candidates"] == 1
    assert run(pipe, prompt=PROMPT, targets=["xray"]).provenance["xray"]["report_candidates"] == 1


def test_guidance_defaults_per_target_kind_and_a_dict_sets_each_target(pipe, phantom):
    xray = {"xray": phantom.images["xray"]}
    report = run(pipe, conditions=xray, targets=["text"], output_type="latent")
    assert torch.equal(report.images["text"], run(pipe, conditions=xray, targets=["text"], output_type="latent", guidance_scale=3.0).images["text"])
    assert not torch.equal(report.images["text"], run(pipe, conditions=xray, targets=["text"], output_type="latent", guidance_scale=2.0).images["text"])
    assert report.provenance["text"]["guidance_scale"] == 3.0
    image = run(pipe, prompt=PROMPT, targets=["xray"], output_type="latent")
    assert torch.equal(image.images["xray"], run(pipe, prompt=PROMPT, targets=["xray"], output_type="latent", guidance_scale=2.0).images["xray"])
    assert image.provenance["xray"]["guidance_scale"] == 2.0
    # Uncoupled joint targets, each at its own scale, match each generated alone at that scale from the same noise;
    # a target at 1 takes the conditional half of the shared guided batch.
    noise = {t: torch.randn(1, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(i)) for i, t in enumerate(["xray", "ct"])}
    scales = {"xray": 1.0, "ct": 4.0}
    both = run(pipe, prompt=PROMPT, targets=["xray", "ct"], output_type="latent", cross_guidance_scale=0.0,
               guidance_scale=scales, latents=noise)
    for target, scale in scales.items():
        assert both.provenance[target]["guidance_scale"] == scale
        alone = run(pipe, prompt=PROMPT, targets=[target], output_type="latent", guidance_scale=scale, latents={target: noise[target]})
        assert torch.allclose(both.images[target], alone.images[target], atol=1e-5), target


def test_report_sources_reach_the_text_denoiser_and_survive_a_partial_load(phantom, tmp_path):
    """A checkpoint with report_sources=["xray"]: X-ray -> report reads V_xray(z_0) through θ_c as well as the
    X-ray's tokens, and a load of just what that call needs (targets=["text"], conditions=["xray"]) gives the same
    report latents bit for bit."""
    components = get_dummy_components()
    multiflow = components["multiflow"]
    guided = MedM2GMultiFlowModel.from_config({**multiflow.config, "report_sources": ["xray"]})
    guided.load_state_dict(multiflow.state_dict())
    plain = MedM2GPipeline(**components)
    full = MedM2GPipeline(**{**components, "multiflow": guided.eval()})
    for p in (plain, full):
        p.set_progress_bar_config(disable=True)
    assert full.accepted_conditions("text") == plain.accepted_conditions("text")
    xray = {"xray": phantom.images["xray"]}
    latents = run(full, conditions=xray, targets=["text"], output_type="latent").images["text"]
    assert not torch.allclose(latents, run(plain, conditions=xray, targets=["text"], output_type="latent").images["text"])
    full.save_pretrained(tmp_path)
    partial = MedM2GPipeline.from_pretrained(tmp_path, targets=["text"], conditions=["xray"])
    partial.set_progress_bar_config(disable=True)
    assert list(partial.multiflow.context_encoders) == ["text", "xray"] and list(partial.multiflow.unets) == ["text"]
    assert torch.equal(run(partial, conditions=xray, targets=["text"], output_type="latent").images["text"], latents)


def test_image_to_image_directions_use_the_source(pipe, phantom):
    mri_to_ct = run(pipe, conditions={"mri_t1": phantom.images["mri_t1"]}, targets=["ct"], output_type="np")
    other = run(pipe, conditions={"mri_t1": np.flipud(phantom.images["mri_t1"]).copy()}, targets=["ct"], output_type="np")
    assert mri_to_ct.images["ct"].shape == (1, SIZE, SIZE)
    assert np.abs(mri_to_ct.images["ct"] - other.images["ct"]).max() > 1e-4
    ct_to_xray = run(pipe, conditions={"ct": phantom.images["ct"]}, targets=["xray"], output_type="pt")
    assert ct_to_xray.images["xray"].shape == (1, 1, SIZE, SIZE)
    multi = run(pipe, conditions={"mri_t2": phantom.images["mri_t2"], "mri_pd": phantom.images["mri_pd"]}, targets=["mri_t1"], output_type="np")
    single = run(pipe, conditions={"mri_t2": phantom.images["mri_t2"]}, targets=["mri_t1"], output_type="np")
    assert np.abs(multi.images["mri_t1"] - single.images["mri_t1"]).max() > 1e-4


def test_ct_in_hu(pipe):
    display = run(pipe, prompt=PROMPT, targets=["ct"], output_type="np").images["ct"]
    hu = run(pipe, prompt=PROMPT, targets=["ct"], output_type="np", ct_in_hu=True).images["ct"]
    np.testing.assert_allclose(hu, display * 2000.0 - 1000.0, atol=1e-2)


# ---------------------------------------------------------------------------------------- diffusers API


def test_pil_outputs_carry_provenance(pipe, tmp_path):
    out = run(pipe, prompt=PROMPT, targets=["xray"])
    image = out.images["xray"][0]
    assert isinstance(image, PIL.Image.Image) and image.mode == "L" and image.size == (SIZE, SIZE)
    image.save(tmp_path / "x.png")
    record = read_provenance(tmp_path / "x.png")
    assert record["synthetic"] is True and record["modality"] == "xray" and record["task"] == "text -> xray"
    assert out.provenance["xray"]["prompt"] == PROMPT


def test_latent_output_and_tuple_return(pipe):
    images, text, provenance = run(pipe, prompt=PROMPT, targets=["ct"], output_type="latent", return_dict=False)
    assert images["ct"].shape == (1, 4, SIZE // 2, SIZE // 2) and text is None and provenance["ct"]["synthetic"] if "synthetic" in provenance["ct"] else True


def test_batch_consistency_and_generator_list(pipe):
    generators = [torch.Generator().manual_seed(s) for s in (0, 1)]
    batched = run(pipe, prompt=[PROMPT, PROMPT], targets=["xray"], output_type="np", generator=generators)
    single = run(pipe, prompt=PROMPT, targets=["xray"], output_type="np", generator=torch.Generator().manual_seed(1))
    assert batched.images["xray"].shape == (2, SIZE, SIZE)
    np.testing.assert_allclose(batched.images["xray"][1], single.images["xray"][0], atol=1e-4)
    several = run(pipe, prompt=PROMPT, targets=["xray"], output_type="np", num_images_per_prompt=3)
    assert several.images["xray"].shape == (3, SIZE, SIZE)


def test_callback_sees_and_can_replace_latents(pipe):
    seen = []

    def callback(pipeline, step, timestep, kwargs):
        seen.append((step, sorted(kwargs["latents"])))
        return {"latents": {key: torch.zeros_like(value) for key, value in kwargs["latents"].items()}}

    out = run(pipe, prompt=PROMPT, targets=["xray", "ct"], output_type="latent", callback_on_step_end=callback)
    assert seen == [(0, ["ct", "xray"]), (1, ["ct", "xray"])]
    assert torch.count_nonzero(out.images["xray"]) == 0


def test_scheduler_is_swappable_and_state_is_per_call(pipe):
    before = pipe.scheduler.config
    pipe_dpm = MedM2GPipeline(**{**pipe.components, "scheduler": DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)})
    pipe_dpm.set_progress_bar_config(disable=True)
    out = run(pipe_dpm, prompt=PROMPT, targets=["xray"], output_type="np")
    assert np.isfinite(out.images["xray"]).all()
    run(pipe, prompt=PROMPT, targets=["ct"], num_inference_steps=3)
    assert pipe.scheduler.config == before and pipe.scheduler.num_inference_steps is None


def test_save_and_load_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    loaded = MedM2GPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    expected = run(pipe, prompt=PROMPT, targets=["xray", "mri_flair"], output_type="np")
    got = run(loaded, prompt=PROMPT, targets=["xray", "mri_flair"], output_type="np")
    for key in expected.images:
        np.testing.assert_array_equal(got.images[key], expected.images[key])
    assert loaded.multiflow.source_slots_of("ct") == SLOTS["ct"]


# -------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prompt": PROMPT, "targets": ["pet"]}, r"targets must be one of"),
        ({"prompt": PROMPT, "targets": "xray"}, r"targets must be a non-empty list"),
        ({"prompt": PROMPT, "targets": []}, r"targets must be a non-empty list"),
        ({"prompt": "   ", "targets": ["xray"]}, r"prompt must not be empty"),
        ({"prompt": "effusion " * 400, "targets": ["xray"]}, r"at most max_text_tokens=160"),
        ({"targets": ["xray"]}, r"pass a prompt, image conditions, or both"),
        ({"prompt": PROMPT, "targets": ["text"]}, r"'text' cannot be a target when a prompt"),
        ({"conditions": {"xray": np.zeros((SIZE, SIZE))}, "targets": ["ct"]}, r"cannot condition 'ct' on \['xray'\]"),
        ({"conditions": {"ct": np.zeros((64, 64))}, "targets": ["xray"]}, r"must be 32x32"),
        ({"conditions": {"ct": np.zeros((2, 3, SIZE, SIZE))}, "targets": ["xray"]}, r"with one channel"),
        ({"conditions": {"ct": PIL.Image.new("RGB", (SIZE, SIZE))}, "targets": ["xray"]}, r"single-channel"),
        ({"conditions": {"ct": np.full((SIZE, SIZE), np.nan)}, "targets": ["xray"]}, r"NaN"),
        ({"conditions": {"ct": np.zeros((SIZE, SIZE))}, "targets": ["ct"]}, r"both a condition and a target"),
        ({"prompt": PROMPT, "targets": ["xray"], "output_type": "dicom"}, r"output_type must be one of"),
        ({"prompt": PROMPT, "targets": ["xray"], "height": 18}, r"height must be a positive multiple of 4"),
        ({"prompt": PROMPT, "targets": ["xray"], "callback_on_step_end_tensor_inputs": ["noise"]}, r"callback_on_step_end_tensor_inputs"),
        ({"prompt": PROMPT, "targets": ["xray"], "report_candidates": 4}, r"report_candidates .* needs 'text' among the targets"),
        ({"conditions": {"xray": np.zeros((SIZE, SIZE))}, "targets": ["text"], "report_candidates": 0}, r"report_candidates must be a positive integer"),
        ({"conditions": {"xray": np.zeros((SIZE, SIZE))}, "targets": ["text"], "report_candidates": True}, r"report_candidates must be a positive integer"),
    ],
)
def test_bad_input_is_a_clear_value_error(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        run(pipe, **kwargs)


RECORDED = {"text_to_xray": [0.658714, 0.394309, 0.344983, 0.628794, 0.415298, 0.594904]}


def test_push_to_hub_goes_through_huggingface_hub_without_network(pipe, monkeypatch, tmp_path):
    """The upload is huggingface_hub's `upload_folder` on a folder save_pretrained wrote (both stubbed here)."""
    import types

    from diffusers.utils import hub_utils
    from huggingface_hub import ModelCard

    uploaded = {}

    def fake_upload_folder(repo_id, folder_path, **kwargs):
        uploaded["repo_id"] = repo_id
        uploaded["files"] = sorted(p.relative_to(folder_path).as_posix() for p in __import__("pathlib").Path(folder_path).rglob("*") if p.is_file())

    monkeypatch.setattr(hub_utils, "create_repo", lambda repo_id, **kwargs: types.SimpleNamespace(repo_id=repo_id))
    monkeypatch.setattr(hub_utils, "load_or_create_model_card", lambda *args, **kwargs: ModelCard("---\nlicense: apache-2.0\n---\n"))
    monkeypatch.setattr(hub_utils, "upload_folder", fake_upload_folder)
    pipe.push_to_hub("someone/medm2g-test")
    assert uploaded["repo_id"] == "someone/medm2g-test"
    assert {"model_index.json", "multiflow/config.json", "multiflow/diffusion_pytorch_model.safetensors",
            "scheduler/scheduler_config.json", "tokenizer/tokenizer.json"} <= set(uploaded["files"])
