"""Tests of `MedM2GTextVAE`: shapes, regularisers, the zero-init injection, BoW head, save/load and decoding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerFast

from medm2g_diffusers.models.text_vae import MedM2GTextVAE, TextVAEEncoderOutput, TextVAEOutput
from medm2g_diffusers.tokenizer import train_report_tokenizer

REPORTS = [
    "FINDINGS: Large right pleural effusion. Heart size is normal. IMPRESSION: Right pleural effusion.",
    "FINDINGS: No pleural effusion. The lungs are clear. IMPRESSION: Normal chest.",
    "FINDINGS: Small left pneumothorax. No consolidation. IMPRESSION: Left pneumothorax.",
]
LATENT_DIM = 8


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return train_report_tokenizer(REPORTS * 2, vocab_size=300, min_frequency=1, model_max_length=48)


def make_model(tokenizer, **overrides) -> MedM2GTextVAE:
    torch.manual_seed(0)
    kwargs = dict(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        text_latent_dim=LATENT_DIM,
        max_position_embeddings=tokenizer.model_max_length,
        encoder_hidden_size=16,
        encoder_num_layers=1,
        encoder_num_heads=2,
        encoder_intermediate_size=32,
        decoder_hidden_size=16,
        decoder_num_layers=1,
        decoder_num_heads=2,
        dropout=0.0,
        num_prefix_tokens=2,
    )
    kwargs.update(overrides)
    return MedM2GTextVAE(**kwargs)


@pytest.fixture
def batch(tokenizer):
    return tokenizer(REPORTS, padding=True, truncation=True, return_tensors="pt")


def test_forward_shapes_and_losses(tokenizer, batch):
    model = make_model(tokenizer)
    out = model(batch.input_ids, batch.attention_mask, generator=torch.Generator().manual_seed(0))
    assert isinstance(out, TextVAEOutput)
    assert out.latent.shape == (3, LATENT_DIM)
    assert out.kl_loss.item() == 0.0
    assert out.reconstruction_loss.item() > 0 and out.bow_loss.item() > 0
    torch.testing.assert_close(out.loss, out.reconstruction_loss + out.bow_loss)
    tuple_out = model(batch.input_ids, batch.attention_mask, generator=torch.Generator().manual_seed(0), return_dict=False)
    assert len(tuple_out) == 5
    torch.testing.assert_close(tuple_out[0], out.loss)


def test_layernorm_latent_is_deterministic_in_eval_and_seeded_in_training(tokenizer, batch):
    model = make_model(tokenizer)
    mean = model.eval().encode(batch.input_ids, batch.attention_mask)
    assert isinstance(mean, TextVAEEncoderOutput)
    torch.testing.assert_close(mean.latent, model.encode(batch.input_ids, batch.attention_mask).latent)
    # LayerNorm without affine: every latent has zero mean and unit variance over its dimensions.
    torch.testing.assert_close(mean.latent.mean(-1), torch.zeros(3), atol=1e-5, rtol=0)

    model.train()
    noisy_a = model.encode(batch.input_ids, batch.attention_mask, generator=torch.Generator().manual_seed(1)).latent
    noisy_b = model.encode(batch.input_ids, batch.attention_mask, generator=torch.Generator().manual_seed(1)).latent
    torch.testing.assert_close(noisy_a, noisy_b)
    noise = noisy_a - mean.latent
    assert 0.02 < noise.std().item() < 0.3  # latent_noise_std = 0.1


def test_kl_regulariser(tokenizer, batch):
    model = make_model(tokenizer, regulariser="kl", kl_weight=0.5)
    out = model(batch.input_ids, batch.attention_mask)
    assert out.kl_loss.item() > 0
    torch.testing.assert_close(out.loss, out.reconstruction_loss + out.bow_loss + 0.5 * out.kl_loss)
    encoded = model.eval().encode(batch.input_ids, batch.attention_mask)
    assert encoded.logvar.shape == (3, LATENT_DIM)
    torch.testing.assert_close(encoded.latent, encoded.mean)


def test_latent_to_embedding_is_zero_initialised_and_inert_at_init(tokenizer, batch):
    model = make_model(tokenizer)
    assert torch.count_nonzero(model.latent_to_embedding.weight) == 0
    assert torch.count_nonzero(model.latent_to_embedding.bias) == 0
    latent = torch.randn(3, LATENT_DIM)
    ids = batch.input_ids
    injected = model._token_embeddings(ids, model.latent_to_embedding(latent).unsqueeze(1))
    torch.testing.assert_close(injected, model.decoder.get_input_embeddings()(ids), rtol=0, atol=0)


def test_bag_of_words_head(tokenizer, batch):
    model = make_model(tokenizer)
    assert model.bow_head.out_features == len(tokenizer)
    latent = torch.randn(3, LATENT_DIM)
    # By hand: mean -log p(token) over each report's non-special tokens, then over the batch.
    log_probs = F.log_softmax(model.bow_head(latent), -1)
    expected = []
    for row, ids in enumerate(batch.input_ids):
        content = [t for t in ids.tolist() if t not in (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)]
        expected.append(-log_probs[row, content].mean())
    torch.testing.assert_close(model._bow_loss(latent, batch.input_ids, batch.attention_mask), torch.stack(expected).mean())

    without = make_model(tokenizer, bow_weight=0.0)
    assert without.bow_head is None
    out = without(batch.input_ids, batch.attention_mask)
    assert out.bow_loss.item() == 0.0
    torch.testing.assert_close(out.loss, out.reconstruction_loss)


def test_gradients_reach_every_trainable_part(tokenizer, batch):
    model = make_model(tokenizer)
    model(batch.input_ids, batch.attention_mask).loss.backward()
    for name in ("encoder.embeddings.word_embeddings.weight", "latent_proj.weight", "latent_to_prefix.weight",
                 "latent_to_embedding.weight", "bow_head.weight", "decoder.transformer.h.0.attn.c_attn.weight",
                 "decoder.lm_head.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_save_and_load_round_trip_bit_for_bit(tokenizer, batch, tmp_path):
    model = make_model(tokenizer).eval()
    model.register_to_config(scaling_factor=0.75)
    model.save_pretrained(tmp_path)
    loaded = MedM2GTextVAE.from_pretrained(tmp_path).eval()
    assert loaded.config.scaling_factor == 0.75
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for key in original:
        assert torch.equal(original[key], restored[key]), key
    torch.testing.assert_close(
        loaded(batch.input_ids, batch.attention_mask).loss, model(batch.input_ids, batch.attention_mask).loss, rtol=0, atol=0
    )


def test_batched_greedy_equals_one_by_one_and_beam_of_one(tokenizer):
    model = make_model(tokenizer).eval()
    latent = torch.randn(4, LATENT_DIM, generator=torch.Generator().manual_seed(0))
    batched = model.generate(latent, max_new_tokens=12)
    for row in range(4):
        single = model.generate(latent[row : row + 1], max_new_tokens=12)[0]
        assert torch.equal(batched[row, : single.shape[0]], single)
        assert (batched[row, single.shape[0] :] == tokenizer.pad_token_id).all()
    assert torch.equal(model.generate(latent, max_new_tokens=12, strategy="beam", num_beams=1), batched)
    assert model.decode(latent, tokenizer, max_new_tokens=12) == tokenizer.batch_decode(batched.tolist(), skip_special_tokens=True)


def test_beam_search_is_deterministic_and_ends_sequences(tokenizer):
    model = make_model(tokenizer).eval()
    latent = torch.randn(2, LATENT_DIM, generator=torch.Generator().manual_seed(3))
    beams = model.generate(latent, max_new_tokens=10, strategy="beam", num_beams=3)
    assert torch.equal(beams, model.generate(latent, max_new_tokens=10, strategy="beam", num_beams=3))
    for row in beams.tolist():
        ended = tokenizer.eos_token_id in row
        assert ended or len(row) == 10
        if ended:
            assert all(t == tokenizer.pad_token_id for t in row[row.index(tokenizer.eos_token_id) + 1 :])


def test_seeded_top_p_is_reproducible(tokenizer):
    model = make_model(tokenizer).eval()
    latent = torch.randn(3, LATENT_DIM, generator=torch.Generator().manual_seed(0))
    kwargs = dict(strategy="top_p", top_p=0.95, temperature=1.5, max_new_tokens=10)
    first = model.generate(latent, generator=torch.Generator().manual_seed(7), **kwargs)
    again = model.generate(latent, generator=torch.Generator().manual_seed(7), **kwargs)
    other = model.generate(latent, generator=torch.Generator().manual_seed(8), **kwargs)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    # One generator per latent: each row equals decoding that latent alone with its generator.
    batched = model.generate(latent, generator=[torch.Generator().manual_seed(s) for s in range(3)], **kwargs)
    for row in range(3):
        single = model.generate(latent[row : row + 1], generator=[torch.Generator().manual_seed(row)], **kwargs)[0]
        assert torch.equal(batched[row, : single.shape[0]], single)


def test_repetition_penalty_follows_ctrl():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    penalised = MedM2GTextVAE._apply_repetition_penalty(logits, torch.tensor([[0, 1, 0]]), 2.0)
    torch.testing.assert_close(penalised, torch.tensor([[1.0, -4.0, 1.0, 0.5]]))


def test_invalid_arguments_name_the_parameter(tokenizer):
    with pytest.raises(ValueError, match="regulariser"):
        make_model(tokenizer, regulariser="vq")
    with pytest.raises(ValueError, match="pooling"):
        make_model(tokenizer, pooling="max")
    model = make_model(tokenizer).eval()
    latent = torch.zeros(1, LATENT_DIM)
    with pytest.raises(ValueError, match="strategy"):
        model.generate(latent, strategy="contrastive")
    with pytest.raises(ValueError, match="latent"):
        model.generate(torch.zeros(1, LATENT_DIM + 1))
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(latent, max_new_tokens=1000)
    other = train_report_tokenizer(["a b c"], vocab_size=300, min_frequency=1)
    other.add_special_tokens({"bos_token": "[EXTRA]"})
    with pytest.raises(ValueError, match="bos_token_id"):
        model.decode(latent, other)
