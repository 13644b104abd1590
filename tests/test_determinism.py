"""The same seed gives the same output: across calls, across processes, and (``batch_invariant=True``) whatever
else is in the batch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_pipeline import get_dummy_pipeline

from medm2g_diffusers import MedM2GPipeline
from medm2g_diffusers.schedulers import scheduler_from_name


A = "FINDINGS: Large left pleural effusion. IMPRESSION: Effusion."
B = "FINDINGS: Cardiomegaly. No effusion. IMPRESSION: Enlarged heart."
C = "FINDINGS: Normal chest."


@pytest.fixture(scope="module")
def pipe():
    return get_dummy_pipeline()


def seeds(*values):
    return [torch.Generator().manual_seed(v) for v in values]


def test_same_seed_same_output_in_one_process(pipe):
    calls = [pipe(prompt=[A, B], targets=["xray", "ct"], generator=seeds(1, 2), num_inference_steps=3, output_type="np") for _ in range(2)]
    for target in ("xray", "ct"):
        assert np.array_equal(calls[0].images[target], calls[1].images[target])
    xray = calls[0].images["xray"][:, None]
    reports = [pipe(conditions={"xray": xray}, targets=["text"], generator=seeds(3, 4), num_inference_steps=3).text for _ in range(2)]
    assert reports[0] == reports[1]
    other = pipe(prompt=[A, B], targets=["xray", "ct"], generator=seeds(1, 5), num_inference_steps=3, output_type="np")
    assert not np.array_equal(other.images["xray"][1], calls[0].images["xray"][1])  # the seed matters


@pytest.mark.parametrize("scheduler, eta", [("ddim", 1.0), ("sde-dpmsolver++", 0.0)])
def test_stochastic_steps_draw_from_the_calls_generator(pipe, scheduler, eta):
    swapped = MedM2GPipeline(**{**pipe.components, "scheduler": scheduler_from_name(scheduler, pipe.scheduler.config)})
    swapped.set_progress_bar_config(disable=True)

    def sample(seed, initial):
        # The same initial noise every time: only the noise the steps draw comes from `seed`.
        return swapped(prompt=[A], targets=["xray"], generator=torch.Generator().manual_seed(seed), latents={"xray": initial},
                       num_inference_steps=3, eta=eta, output_type="np").images["xray"]

    size = pipe.image_size // pipe.vae_scale_factor
    initial = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(0))
    first, again, other = sample(1, initial), sample(1, initial), sample(2, initial)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)  # the steps' noise is drawn, and from this generator


SCRIPT = """
import sys, numpy as np, torch
torch.set_num_threads({threads})  # the same reduction order as this process
sys.path.insert(0, {tests!r})
from tiny_pipeline import get_dummy_pipeline
pipe = get_dummy_pipeline()
out = pipe(prompt={prompt!r}, targets=["xray", "mri_t2"], generator=torch.Generator().manual_seed(7), num_inference_steps=3, output_type="np")
np.savez(sys.argv[1], **out.images)
"""


def test_same_seed_same_output_across_processes(pipe, tmp_path):
    """A fresh interpreter (new allocator state, new thread pool of the same size) reproduces this process's output
    bit for bit."""
    path = tmp_path / "other_process.npz"
    subprocess.run([sys.executable, "-c", SCRIPT.format(tests=str(Path(__file__).parent), prompt=A, threads=torch.get_num_threads()), str(path)], check=True, timeout=240)
    here = pipe(prompt=A, targets=["xray", "mri_t2"], generator=torch.Generator().manual_seed(7), num_inference_steps=3, output_type="np")
    there = np.load(path)
    for target in ("xray", "mri_t2"):
        assert np.array_equal(here.images[target], there[target])


@pytest.mark.parametrize("targets", [["xray"], ["xray", "ct"]])
def test_batch_invariant_sample_does_not_depend_on_the_rest_of_the_batch(pipe, targets):
    kwargs = dict(targets=targets, num_inference_steps=3, output_type="np", batch_invariant=True)
    alone = pipe(prompt=[B], generator=seeds(2), **kwargs)
    first = pipe(prompt=[B, A], generator=seeds(2, 1), **kwargs)
    last = pipe(prompt=[A, C, B], generator=seeds(1, 3, 2), **kwargs)
    repeated = pipe(prompt=[A, B], generator=seeds(1, 8, 9, 2), num_images_per_prompt=2, **kwargs)
    for target in targets:
        reference = alone.images[target][0]
        assert first.images[target].shape[0] == 2 and last.images[target].shape[0] == 3 and repeated.images[target].shape[0] == 4
        for other in (first.images[target][0], last.images[target][2], repeated.images[target][3]):
            assert np.array_equal(reference, other)


def test_batch_invariant_image_conditions_and_reports(pipe):
    images = pipe(prompt=[A, B], targets=["ct"], generator=seeds(1, 2), num_inference_steps=3, output_type="np", ct_in_hu=True).images["ct"]
    kwargs = dict(targets=["text", "xray"], num_inference_steps=3, output_type="np", batch_invariant=True)
    batched = pipe(conditions={"ct": images[:, None]}, generator=seeds(4, 5), **kwargs)
    alone = pipe(conditions={"ct": images[1]}, generator=seeds(5), **kwargs)
    assert batched.text[1] == alone.text[0]
    assert np.array_equal(batched.images["xray"][1], alone.images["xray"][0])


def test_batch_invariant_pil_and_tuple_outputs(pipe):
    kwargs = dict(targets=["xray"], num_inference_steps=2, batch_invariant=True)
    pil = pipe(prompt=[A, B], generator=seeds(1, 2), **kwargs)
    assert len(pil.images["xray"]) == 2 and pil.images["xray"][0].info  # provenance kept per image
    images, text, provenance = pipe(prompt=[A, B], generator=seeds(1, 2), return_dict=False, **kwargs)
    assert text is None and provenance["xray"]["modality"] == "xray"
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images["xray"], pil.images["xray"]))


def test_batch_invariant_checks_the_generator_list(pipe):
    with pytest.raises(ValueError, match="generator"):
        pipe(prompt=[A, B], targets=["xray"], generator=seeds(1), num_inference_steps=2, batch_invariant=True)
