"""Tests of the stage-3 models: `ContextEncoder` (V_m, f_m), the cross-guided processors (θ_c) and
`MedM2GMultiFlowModel` (wiring, start at the single-flow models, save/load, what trains)."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from medm2g_diffusers.models.attention_processor import CrossGuidedAttnProcessor2_0, GuidanceAwareAttnProcessor2_0
from medm2g_diffusers.models.context_encoder import ContextEncoder
from medm2g_diffusers.models.multiflow import MedM2GMultiFlowModel
from medm2g_diffusers.models.text_unet import MedM2GTextUNet
from medm2g_diffusers.single_flow import Condition, build_image_unet, unet_condition_kwargs

COND = 16  # shared space: the UNets' cross_attention_dim and the guidance tokens' width
CHANNELS, SIZE, TEXT_DIM, BATCH = 4, 8, 8, 2
CONTEXT_KWARGS = dict(hidden_dim=16, token_grid=2, num_latent_tokens=2, num_adaptive_tokens=3, norm_num_groups=8)


def make_single_flow() -> dict[str, torch.nn.Module]:
    unets = {}
    for family, classes in [("xray", None), ("mri", 4)]:
        torch.manual_seed(0)
        unets[family] = build_image_unet(SIZE, CHANNELS, COND, (8, 16), 1, 8, classes, 8)
    torch.manual_seed(0)
    unets["text"] = MedM2GTextUNet(in_channels=TEXT_DIM, hidden_dim=16, num_blocks=1, cross_attention_dim=COND, attention_head_dim=8)
    return {family: unet.eval() for family, unet in unets.items()}


def make_model(single_flow: dict[str, torch.nn.Module]) -> MedM2GMultiFlowModel:
    torch.manual_seed(0)
    return MedM2GMultiFlowModel.from_single_flow(single_flow, CONTEXT_KWARGS).eval()


def perturb_guidance(model: MedM2GMultiFlowModel) -> None:
    """Moves θ_c away from its zero-value start, as training would."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for family in model.unets:
            for _, processor in model._cross_guided_layers(family):
                for parameter in processor.parameters():
                    parameter.copy_(torch.randn(parameter.shape, generator=generator))


def joint_inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    latents = {
        "xray": torch.randn(BATCH, CHANNELS, SIZE, SIZE, generator=generator),
        "mri_t2": torch.randn(BATCH, CHANNELS, SIZE, SIZE, generator=generator),
        "text": torch.randn(BATCH, TEXT_DIM, 1, 1, generator=generator),
    }
    timesteps = {"xray": torch.tensor([3, 700]), "mri_t2": torch.tensor([50, 999]), "text": torch.tensor(400)}
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    conditions = {key: Condition(torch.randn(BATCH, 3, COND, generator=generator), mask) for key in latents}
    return latents, timesteps, conditions


def single_flow_prediction(unets, key, latents, timesteps, conditions) -> torch.Tensor:
    family = {"mri_t2": "mri"}.get(key, key)
    extra = {"class_labels": torch.full((BATCH,), 1)} if family == "mri" else {}
    condition = conditions[key]
    return unets[family](
        latents[key], timesteps[key], encoder_hidden_states=condition.tokens, encoder_attention_mask=condition.mask, **extra
    ).sample


@pytest.fixture(scope="module")
def single_flow():
    return make_single_flow()


# ---------------------------------------------------------------------------------------------- ContextEncoder


def test_context_encoder_image_tokens():
    torch.manual_seed(0)
    encoder = ContextEncoder(in_channels=CHANNELS, cross_attention_dim=COND, **CONTEXT_KWARGS)
    sample = torch.randn(BATCH, CHANNELS, SIZE, SIZE)
    tokens = encoder(sample, torch.tensor([10, 900]))
    assert encoder.num_tokens == 2 * 2 + 3
    assert tokens.shape == (BATCH, encoder.num_tokens, COND)
    # The adaptive tokens close the sequence, the same for every sample.
    torch.testing.assert_close(tokens[:, -3:], encoder.adaptive_tokens.expand(BATCH, -1, -1))
    # Adaptive pooling: another latent size gives the same token count.
    assert encoder(torch.randn(BATCH, CHANNELS, 12, 12), 5).shape == tokens.shape
    # The timestep reaches every latent token.
    other_time = encoder(sample, torch.tensor([11, 900]))
    assert (other_time[0, :4] - tokens[0, :4]).abs().amax(-1).min() > 0
    torch.testing.assert_close(other_time[1], tokens[1])
    with pytest.raises(ValueError, match="sample must have shape"):
        encoder(torch.randn(BATCH, CHANNELS + 1, SIZE, SIZE), 5)


def test_context_encoder_text_tokens():
    torch.manual_seed(0)
    encoder = ContextEncoder(in_channels=TEXT_DIM, latent_type="text", cross_attention_dim=COND, **CONTEXT_KWARGS)
    tokens = encoder(torch.randn(BATCH, TEXT_DIM, 1, 1), 7)
    assert tokens.shape == (BATCH, 2 + 3, COND) and encoder.num_tokens == 5
    with pytest.raises(ValueError, match=r"\(batch, 8, 1, 1\)"):
        encoder(torch.randn(BATCH, TEXT_DIM, 2, 2), 7)
    with pytest.raises(ValueError, match="latent_type"):
        ContextEncoder(latent_type="audio")


def test_adaptive_tokens_initialised_from_embeddings():
    encoder = ContextEncoder(in_channels=CHANNELS, cross_attention_dim=COND, **CONTEXT_KWARGS)
    embeddings = torch.randn(10, COND)
    encoder.initialize_adaptive_tokens(embeddings, generator=torch.Generator().manual_seed(0))
    tokens = encoder.adaptive_tokens.detach()
    # K distinct rows of the embeddings, and the same draw for the same seed.
    matches = (tokens[:, None, :] == embeddings[None]).all(-1)
    assert matches.sum(1).tolist() == [1, 1, 1] and len(set(matches.float().argmax(1).tolist())) == 3
    encoder.initialize_adaptive_tokens(embeddings, generator=torch.Generator().manual_seed(0))
    assert torch.equal(encoder.adaptive_tokens.detach(), tokens)

    few = torch.randn(2, COND)  # M < K: the mean plus small noise, tokens still distinct
    encoder.initialize_adaptive_tokens(few, generator=torch.Generator().manual_seed(0))
    tokens = encoder.adaptive_tokens.detach()
    torch.testing.assert_close(tokens, few.mean(0).expand(3, -1), atol=0.1, rtol=0)
    assert torch.unique(tokens, dim=0).shape[0] == 3
    with pytest.raises(ValueError, match=r"\(M >= 1, 16\)"):
        encoder.initialize_adaptive_tokens(torch.randn(4, COND + 1))


# ------------------------------------------------------------------------------------------------ processors


def make_attention(cross: bool) -> Attention:
    torch.manual_seed(0)
    return Attention(query_dim=16, cross_attention_dim=12 if cross else None, heads=2, dim_head=8).eval()


@pytest.mark.parametrize("cross", [True, False])
def test_processors_without_guidance_match_attnprocessor2_0_bit_for_bit(cross):
    attn = make_attention(cross)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(BATCH, 5, 16, generator=generator)
    encoder = torch.randn(BATCH, 4, 12, generator=generator) if cross else None
    # Additive bias over keys, as UNet2DConditionModel prepares it.
    mask = torch.tensor([[0.0, 0.0, -10000.0, 0.0], [0.0, 0.0, 0.0, 0.0]])[:, None] if cross else None
    expected = AttnProcessor2_0()(attn, hidden, encoder, mask)

    guided = CrossGuidedAttnProcessor2_0(attn.to_k.out_features, attn.to_v.out_features, guidance_dim=6)
    with torch.no_grad():
        guided.to_v_guide.weight.normal_()  # the branch would change the output if it ran
    guidance = torch.randn(BATCH, 3, 6, generator=generator)
    assert torch.equal(guided(attn, hidden, encoder, mask), expected)
    assert torch.equal(guided(attn, hidden, encoder, mask, guidance_hidden_states=guidance, guidance_scale=0.0), expected)
    assert torch.equal(GuidanceAwareAttnProcessor2_0()(attn, hidden, encoder, mask, guidance_hidden_states=guidance), expected)
    assert not torch.equal(guided(attn, hidden, encoder, mask, guidance_hidden_states=guidance), expected)


def test_cross_guided_processor_scale_and_mask():
    attn = make_attention(cross=True)
    generator = torch.Generator().manual_seed(0)
    hidden, encoder = torch.randn(BATCH, 5, 16, generator=generator), torch.randn(BATCH, 4, 12, generator=generator)
    processor = CrossGuidedAttnProcessor2_0(attn.to_k.out_features, attn.to_v.out_features, guidance_dim=6, scale=0.5)
    guidance = torch.randn(BATCH, 3, 6, generator=generator)
    plain = processor(attn, hidden, encoder)
    # Zero-initialised values: the branch adds exactly nothing before training.
    assert torch.equal(processor(attn, hidden, encoder, guidance_hidden_states=guidance), plain)

    with torch.no_grad():
        processor.to_v_guide.weight.normal_(generator=generator)
    delta_default = processor(attn, hidden, encoder, guidance_hidden_states=guidance) - plain
    delta_one = processor(attn, hidden, encoder, guidance_hidden_states=guidance, guidance_scale=1.0) - plain
    assert delta_default.abs().amax() > 1e-3
    # Linear in the scale (the branch is added before the linear output projection, whose bias cancels).
    torch.testing.assert_close(delta_one, 2 * delta_default, atol=1e-5, rtol=1e-4)

    # A masked guidance token has no influence.
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    changed = guidance.clone()
    changed[:, 2] += 5.0
    torch.testing.assert_close(
        processor(attn, hidden, encoder, guidance_hidden_states=changed, guidance_attention_mask=mask),
        processor(attn, hidden, encoder, guidance_hidden_states=guidance, guidance_attention_mask=mask),
    )
    with pytest.raises(ValueError, match="guidance_hidden_states must have 6 features"):
        processor(attn, hidden, encoder, guidance_hidden_states=torch.randn(BATCH, 3, 7))
    with pytest.raises(ValueError, match="guidance_attention_mask must have shape"):
        processor(attn, hidden, encoder, guidance_hidden_states=guidance, guidance_attention_mask=mask[:, :2])


# ----------------------------------------------------------------------------------------------- multi-flow


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_guidance_kwargs_reach_every_layer_without_warnings(single_flow):
    model = make_model(single_flow)
    names = {family: set(unet.attn_processors) for family, unet in model.unets.items()}
    # Cross-attention layers carry θ_c; self-attention layers only accept the kwargs.
    for family, unet in model.unets.items():
        for name, processor in unet.attn_processors.items():
            expected = GuidanceAwareAttnProcessor2_0 if name.endswith("attn1.processor") else CrossGuidedAttnProcessor2_0
            assert type(processor) is expected, (family, name)
    assert any(name.endswith("attn1.processor") for name in names["xray"])

    capture = _Capture()
    logger = logging.getLogger("diffusers.models.attention_processor")
    logger.addHandler(capture)
    try:
        # The capture works: a stock processor given the kwargs does warn.
        attn = make_attention(cross=False)
        attn(torch.randn(1, 2, 16), guidance_hidden_states=torch.randn(1, 1, COND))
        assert capture.messages and "guidance_hidden_states" in capture.messages[0]
        capture.messages.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model(*joint_inputs())
    finally:
        logger.removeHandler(capture)
    assert capture.messages == []


def test_starts_exactly_at_the_single_flow_models(single_flow):
    model = make_model(single_flow)
    for family, unet in single_flow.items():
        copied = model.unets[family].state_dict()
        for name, value in unet.state_dict().items():
            assert torch.equal(copied[name], value), (family, name)
    latents, timesteps, conditions = joint_inputs()
    with torch.no_grad():
        predictions = model(latents, timesteps, conditions)
        for key in latents:
            expected = single_flow_prediction(single_flow, key, latents, timesteps, conditions)
            assert torch.equal(predictions[key], expected), key


def test_a_pooled_condition_denoiser_gets_its_tokens_mean_from_the_joint_step(tmp_path):
    """A denoiser built with pooled_condition reads the masked token mean (timestep_cond) inside the multi-flow
    step too, and keeps it through save/load."""
    unets = make_single_flow()
    torch.manual_seed(0)
    unets["xray"] = build_image_unet(SIZE, CHANNELS, COND, (8, 16), 1, 8, None, 8, pooled_condition=True).eval()
    model = make_model(unets)
    latents, timesteps, conditions = joint_inputs()
    alone = {"xray": latents["xray"]}
    condition = conditions["xray"]
    with torch.no_grad():
        prediction = model(alone, timesteps, conditions)["xray"]
        expected = unets["xray"](latents["xray"], timesteps["xray"], **unet_condition_kwargs(unets["xray"], condition.tokens, condition.mask)).sample
        without_pooled = unets["xray"](latents["xray"], timesteps["xray"], encoder_hidden_states=condition.tokens,
                                       encoder_attention_mask=condition.mask).sample
    assert torch.equal(prediction, expected)
    assert not torch.allclose(prediction, without_pooled)
    model.save_pretrained(tmp_path)
    reloaded = MedM2GMultiFlowModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(alone, timesteps, conditions)["xray"], prediction)


def test_guidance_couples_the_flows_and_never_feeds_a_stream_its_own_latent(single_flow):
    model = make_model(single_flow)
    perturb_guidance(model)
    latents, timesteps, conditions = joint_inputs()
    seen = []

    def record(module, args, kwargs):
        guidance = kwargs["cross_attention_kwargs"]
        seen.append(None if guidance is None else guidance["guidance_hidden_states"].clone())

    hook = model.unets["xray"].register_forward_pre_hook(record, with_kwargs=True)
    with torch.no_grad():
        base = model(latents, timesteps, conditions)
        own = model({**latents, "xray": latents["xray"] + 1.0}, timesteps, conditions)
        other = model({**latents, "mri_t2": latents["mri_t2"] + 1.0}, timesteps, conditions)
        alone = model({"xray": latents["xray"]}, timesteps, conditions)
    hook.remove()

    # xray's guidance is V_mri(z_mri) and V_text(z_text): a function of the other latents only.
    assert seen[0].shape == (BATCH, (2 * 2 + 3) + (2 + 3), COND)  # MRI grid 2x2, text 2 tokens, K = 3 each
    assert torch.equal(seen[1], seen[0])
    assert not torch.equal(seen[2], seen[0])
    # Changing another stream's latent changes xray's prediction (and the text one, which also reads it).
    assert (other["xray"] - base["xray"]).abs().amax() > 1e-4
    assert (other["text"] - base["text"]).abs().amax() > 1e-4
    # Alone, a stream gets no guidance: exactly its single-flow model, θ_c or not.
    assert len(seen) == 4 and seen[3] is None
    assert torch.equal(alone["xray"], single_flow_prediction(single_flow, "xray", latents, timesteps, conditions))
    assert not torch.equal(own["xray"], base["xray"])  # its own latent still enters, through the UNet input


def test_save_and_load_round_trip(single_flow, tmp_path):
    model = make_model(single_flow)
    perturb_guidance(model)
    model.context_encoders["text"].initialize_adaptive_tokens(torch.randn(6, COND), torch.Generator().manual_seed(0))
    model.save_pretrained(tmp_path)
    loaded = MedM2GMultiFlowModel.from_pretrained(tmp_path).eval()

    state, reloaded = model.state_dict(), loaded.state_dict()
    assert list(state) == list(reloaded)  # same order too: optimizer state keyed by position survives a reload
    assert all(torch.equal(state[name], reloaded[name]) for name in state)
    for family in model.unets:
        before = {name: type(p).__name__ for name, p in model.unets[family].attn_processors.items()}
        after = {name: type(p).__name__ for name, p in loaded.unets[family].attn_processors.items()}
        assert before == after
    latents, timesteps, conditions = joint_inputs()
    with torch.no_grad():
        expected, got = model(latents, timesteps, conditions), loaded(latents, timesteps, conditions)
    assert all(torch.equal(expected[key], got[key]) for key in latents)


def test_trainable_parameters_are_v_f_and_theta_c_only(single_flow):
    model = make_model(single_flow)
    perturb_guidance(model)
    trainable = model.trainable_parameters(["xray", "text"])
    expected = {
        id(p)
        for family in ("xray", "text")
        for module in [model.context_encoders[family]] + [proc for _, proc in model._cross_guided_layers(family)]
        for p in module.parameters()
    }
    assert {id(p) for p in trainable} == expected
    assert any(p is model.context_encoders["xray"].adaptive_tokens for p in trainable)
    assert {id(p) for p in model.parameters() if p.requires_grad} == expected

    latents, timesteps, conditions = joint_inputs()
    predictions = model(latents, timesteps, conditions)
    sum(prediction.pow(2).mean() for prediction in predictions.values()).backward()
    for name, parameter in model.named_parameters():
        if id(parameter) in expected:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None, name

    with pytest.raises(ValueError, match="families and denoisers must be subsets"):
        model.trainable_parameters(["ct"])


def test_forward_errors(single_flow):
    model = make_model(single_flow)
    latents, timesteps, conditions = joint_inputs()
    with pytest.raises(ValueError, match="timesteps must have an entry"):
        model(latents, {"xray": timesteps["xray"]}, conditions)
    with pytest.raises(ValueError, match=r"class_labels\['mri'\] is required"):
        model({"mri": latents["mri_t2"]}, {"mri": 5}, {"mri": conditions["mri_t2"]})
    with pytest.raises(ValueError, match="same batch size"):
        model({**latents, "text": latents["text"][:1]}, timesteps, conditions)
    with torch.no_grad():
        by_family = model({"mri": latents["mri_t2"]}, {"mri": 5}, {"mri": conditions["mri_t2"]}, {"mri": torch.tensor([1, 1])})
        by_modality = model({"mri_t2": latents["mri_t2"]}, {"mri_t2": 5}, {"mri_t2": conditions["mri_t2"]})
    assert torch.equal(by_family["mri"], by_modality["mri_t2"])  # mri_t2 is contrast index 1


# ------------------------------------------------------------------------------------------------ source slots

SLOTS = {"xray": ["ct"], "mri": ["mri_t1", "mri_t2", "mri_pd", "mri_flair"]}


def make_slotted_model(single_flow, source_guidance: bool = False) -> MedM2GMultiFlowModel:
    unets = {**single_flow, "ct": single_flow["xray"]}
    torch.manual_seed(0)
    return MedM2GMultiFlowModel.from_single_flow(unets, CONTEXT_KWARGS, source_slots=SLOTS, source_guidance=source_guidance).eval()


def test_source_slots_widen_conv_in_with_zeros_and_start_at_single_flow(single_flow):
    model = make_slotted_model(single_flow)
    conv = model.unets["xray"].conv_in
    assert conv.in_channels == CHANNELS * 2 + 1 == model.unets["xray"].config.in_channels
    assert torch.equal(conv.weight[:, :CHANNELS], single_flow["xray"].conv_in.weight)
    assert torch.count_nonzero(conv.weight[:, CHANNELS:]) == 0
    assert model.unets["mri"].config.in_channels == CHANNELS * 5 + 4
    latents, timesteps, conditions = joint_inputs()
    source = torch.randn(BATCH, CHANNELS, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = model({"xray": latents["xray"]}, timesteps, conditions, sources={"xray": {"ct": source}})
    expected = single_flow_prediction(single_flow, "xray", latents, timesteps, conditions)
    assert torch.allclose(got["xray"], expected, atol=1e-6)  # zero weights: the source does not enter yet


def test_source_slots_carry_the_source_and_its_mask(single_flow):
    model = make_slotted_model(single_flow)
    with torch.no_grad():
        model.unets["xray"].conv_in.weight.normal_(generator=torch.Generator().manual_seed(2))
    latents, timesteps, conditions = joint_inputs()
    source = torch.randn(BATCH, CHANNELS, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    run = lambda **kw: model({"xray": latents["xray"]}, timesteps, conditions, **kw)["xray"]  # noqa: E731
    with torch.no_grad():
        absent, present = run(), run(sources={"xray": {"ct": source}})
        shifted = run(sources={"xray": {"ct": source + 1}})
        dropped = run(sources={"xray": {"ct": source}}, source_keep={"xray": {"ct": torch.tensor([True, False])}})
    assert (present - absent).abs().amax() > 1e-3 and (shifted - present).abs().amax() > 1e-3
    assert torch.allclose(dropped[1], absent[1], atol=1e-6) and torch.allclose(dropped[0], present[0], atol=1e-6)
    channels = model.source_input("mri", {"mri_t2": source}, None, latents["xray"])
    assert channels.shape == (BATCH, 4 * (CHANNELS + 1), SIZE, SIZE)
    assert torch.equal(channels[:, 5:9], source) and channels[:, 9].eq(1).all()
    assert channels[:, :5].eq(0).all() and channels[:, 10:].eq(0).all()


def test_source_slots_round_trip_and_errors(single_flow, tmp_path):
    model = make_slotted_model(single_flow, source_guidance=True)
    model.save_pretrained(tmp_path)
    loaded = MedM2GMultiFlowModel.from_pretrained(tmp_path).eval()
    assert loaded.source_slots_of("mri") == SLOTS["mri"] and loaded.config.source_guidance
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    assert "mri_t1" in loaded.accepted_sources("ct") and loaded.accepted_sources("text") == []

    latents, timesteps, conditions = joint_inputs()
    with pytest.raises(ValueError, match=r"accepts image sources"):
        model({"text": latents["text"]}, timesteps, conditions, sources={"text": {"ct": latents["xray"]}})
    with pytest.raises(ValueError, match="must be a latent of shape"):
        model({"xray": latents["xray"]}, timesteps, conditions, sources={"xray": {"ct": latents["xray"][:, :2]}})
    with pytest.raises(ValueError, match="sources and source_keep keys"):
        model({"xray": latents["xray"]}, timesteps, conditions, sources={"ct": {}})
    with pytest.raises(ValueError, match="imaging families"):
        MedM2GMultiFlowModel.from_single_flow(single_flow, CONTEXT_KWARGS, source_slots={"text": ["ct"]})
    with pytest.raises(ValueError, match="must take"):
        MedM2GMultiFlowModel(loaded.config.unet_configs, loaded.config.context_encoder_configs, source_slots={"xray": ["ct", "mri_t1"]})


def test_source_guidance_routes_a_clean_source_through_theta_c(single_flow):
    model = make_slotted_model(single_flow, source_guidance=True)
    perturb_guidance(model)
    latents, timesteps, conditions = joint_inputs()
    source = torch.randn(BATCH, CHANNELS, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        # ct is no slot of the MRI denoiser: with source_guidance it still conditions, through V_ct(z_0) only.
        base = model({"mri_t2": latents["mri_t2"]}, timesteps, conditions)["mri_t2"]
        guided = model({"mri_t2": latents["mri_t2"]}, timesteps, conditions, sources={"mri_t2": {"ct": source}})["mri_t2"]
    assert (guided - base).abs().amax() > 1e-4


def test_report_sources_route_a_clean_image_to_the_text_denoiser_through_theta_c(single_flow, tmp_path):
    torch.manual_seed(0)
    model = MedM2GMultiFlowModel.from_single_flow(single_flow, CONTEXT_KWARGS, report_sources=["xray"]).eval()
    assert model.accepted_sources("text") == ["xray"] and model.accepted_sources("xray") == []
    latents, timesteps, conditions = joint_inputs()
    source = torch.randn(BATCH, CHANNELS, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    alone = {"text": latents["text"]}
    with torch.no_grad():
        base = model(alone, timesteps, conditions)["text"]
        zero_start = model(alone, timesteps, conditions, sources={"text": {"xray": source}})["text"]
        assert torch.equal(zero_start, base)  # θ_c starts at zero values: the source enters only once trained
        perturb_guidance(model)
        base = model(alone, timesteps, conditions)["text"]
        guided = model(alone, timesteps, conditions, sources={"text": {"xray": source}})["text"]
        shifted = model(alone, timesteps, conditions, sources={"text": {"xray": source + 1}})["text"]
        # The route is V_xray(z_0, t=0): the same tokens the model's guidance_tokens gives a clean latent.
        tokens = model.context_encoders["xray"](source, 0)
        direct = model.unets["text"](latents["text"], timesteps["text"], **unet_condition_kwargs(
            model.unets["text"], conditions["text"].tokens, conditions["text"].mask),
            cross_attention_kwargs={"guidance_hidden_states": tokens, "guidance_scale": 1.0}).sample
    assert (guided - base).abs().amax() > 1e-4 and (shifted - guided).abs().amax() > 1e-4
    assert torch.allclose(guided, direct, atol=1e-6)

    model.save_pretrained(tmp_path)
    loaded = MedM2GMultiFlowModel.from_pretrained(tmp_path).eval()
    assert loaded.config.report_sources == ["xray"] and loaded.accepted_sources("text") == ["xray"]
    with torch.no_grad():
        assert torch.equal(loaded(alone, timesteps, conditions, sources={"text": {"xray": source}})["text"], guided)
    partial = MedM2GMultiFlowModel.from_pretrained(tmp_path, families=["text"], source_families=["xray"]).eval()
    with torch.no_grad():
        assert torch.equal(partial(alone, timesteps, conditions, sources={"text": {"xray": source}})["text"], guided)
    with pytest.raises(ValueError, match="accepts image sources"):
        model(alone, timesteps, conditions, sources={"text": {"mri_t2": source}})
    with pytest.raises(ValueError, match="report_sources must list distinct imaging families"):
        MedM2GMultiFlowModel.from_single_flow(single_flow, CONTEXT_KWARGS, report_sources=["ct"])
    with pytest.raises(ValueError, match="report_sources needs a text denoiser"):
        MedM2GMultiFlowModel.from_single_flow({"xray": single_flow["xray"]}, CONTEXT_KWARGS, report_sources=["xray"])


def test_denoisers_train_whole_when_asked(single_flow):
    model = make_slotted_model(single_flow)
    trainable = {id(p) for p in model.trainable_parameters(["ct"], denoisers=["xray"])}
    assert {id(p) for p in model.unets["xray"].parameters()} <= trainable
    assert not {id(p) for p in model.unets["mri"].parameters()} & trainable
    assert {id(p) for p in model.context_encoders["ct"].parameters()} <= trainable
