"""`scheduler_from_name`: the samplers `--scheduler` picks keep the checkpoint's noise schedule, and every one of
them samples every kind of target (images and the flat text latent)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medm2g_diffusers import MedM2GPipeline
from medm2g_diffusers.schedulers import SCHEDULERS, scheduler_from_name

from tiny_pipeline import get_dummy_pipeline

PROMPT = "Large right pleural effusion. Heart size is normal."


@pytest.fixture(scope="module")
def pipe():
    return get_dummy_pipeline()


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_the_noise_schedule_and_prediction_type_carry_over(pipe, name):
    config = dict(pipe.scheduler.config)
    scheduler = scheduler_from_name(name, pipe.scheduler.config)
    assert type(scheduler).__name__ == SCHEDULERS[name][0]
    for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type", "steps_offset", "timestep_spacing"):
        assert scheduler.config[key] == config[key], key
    assert torch.allclose(scheduler.alphas_cumprod, pipe.scheduler.alphas_cumprod)
    assert dict(pipe.scheduler.config) == config  # the source config is not changed


def test_settings_and_spacing_override():
    from diffusers import DDIMScheduler

    config = DDIMScheduler(beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction", timestep_spacing="leading", steps_offset=1).config
    dpm = scheduler_from_name("dpmsolver++", config, timestep_spacing="trailing")
    assert dpm.config.algorithm_type == "dpmsolver++" and dpm.config.solver_order == 2
    assert dpm.config.timestep_spacing == "trailing"
    dpm.set_timesteps(20)
    assert int(dpm.timesteps[0]) == 999  # trailing starts at the last training step; leading would not
    leading = scheduler_from_name("dpmsolver++", config)
    leading.set_timesteps(20)
    assert int(leading.timesteps[0]) < 999


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="plms"), "scheduler must be one of"),
    (dict(name="ddim", timestep_spacing="even"), "timestep_spacing must be one of"),
])
def test_bad_names_are_refused(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        scheduler_from_name(config=pipe.scheduler.config, **kwargs)


@pytest.mark.parametrize("name", ["dpmsolver++", "sde-dpmsolver++", "unipc", "euler"])
def test_every_scheduler_samples_images_and_text_and_is_recorded(pipe, name):
    swapped = MedM2GPipeline(**{**pipe.components, "scheduler": scheduler_from_name(name, pipe.scheduler.config)})
    swapped.set_progress_bar_config(disable=True)

    def sample(p, **kwargs):
        return p(num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np", **kwargs)

    image = sample(swapped, prompt=PROMPT, targets=["xray"])
    assert np.isfinite(image.images["xray"]).all()
    assert image.provenance["xray"]["scheduler"] == SCHEDULERS[name][0]
    # Same initial noise, another solver: not the same computation as DDIM's.
    assert not np.array_equal(sample(pipe, prompt=PROMPT, targets=["xray"]).images["xray"], image.images["xray"])
    # The text target's flat (B, D, 1, 1) latent goes through the same solver.
    condition = {"xray": torch.from_numpy(image.images["xray"][:, None])}
    latent = swapped(conditions=condition, targets=["text"], num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                     output_type="latent").images["text"]
    assert latent.shape[2:] == (1, 1) and torch.isfinite(latent).all()
    report = sample(swapped, conditions=condition, targets=["text"]).text
    assert isinstance(report[0], str) and report[0]
