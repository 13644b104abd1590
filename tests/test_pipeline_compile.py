"""A `torch.compile`d UNet runs inside `MedM2GPipeline` unchanged (the opt-in speed-up of docs/performance.md §3).

Slow (inductor compiles a C++ kernel set on first use, tens of seconds): run with ``-m slow``."""

from __future__ import annotations

import pytest
import torch

from tiny_pipeline import get_dummy_pipeline

pytestmark = pytest.mark.slow


def test_compiled_unet_gives_the_eager_output():
    pipe = get_dummy_pipeline()
    kwargs = dict(prompt=["Small left pleural effusion."] * 2, targets=["xray"], num_inference_steps=3, output_type="np")
    eager = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images["xray"]
    eager_unet = pipe.multiflow.unets["xray"]
    torch._dynamo.reset()
    pipe.multiflow.unets["xray"] = torch.compile(eager_unet)
    compiled = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images["xray"]
    # The compiled module wraps the same parameters, so only the kernels (fused, reordered float sums) differ.
    assert pipe.multiflow.unets["xray"]._orig_mod is eager_unet
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the pipeline ran the compiled module
    assert compiled.shape == eager.shape
    assert abs(compiled - eager).max() < 1e-4
