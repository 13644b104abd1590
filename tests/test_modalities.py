import numpy as np
import pytest
import torch

from medm2g_diffusers import modalities as M


def test_registry_keys_and_families():
    assert M.modality_keys() == ["text", "xray", "ct", "mri_t1", "mri_t2", "mri_pd", "mri_flair", "mri_t1c"]
    assert M.family_keys() == ["text", "xray", "ct", "mri"]
    assert M.modalities_of_family("mri") == ["mri_t1", "mri_t2", "mri_pd", "mri_flair", "mri_t1c"]
    # T1c comes last, so checkpoints trained on the four phantom contrasts keep their contrast indices.
    assert [M.get_modality(k).contrast_index for k in M.modalities_of_family("mri")] == [0, 1, 2, 3, 4]
    assert "text" not in M.image_modality_keys()


def test_unknown_modality_error_names_parameter_and_choices():
    with pytest.raises(ValueError, match=r"targets must be one of \['text', 'xray'.*got 'pet'"):
        M.get_modality("pet", parameter="targets")
    with pytest.raises(ValueError, match="family must be one of"):
        M.modalities_of_family("pet")


def test_reregistering_is_an_error():
    with pytest.raises(ValueError, match="already registered"):
        M.register_modality(M.Modality("ct", "ct", "CT again"))


def test_ct_round_trip_within_one_hu_inside_window():
    hu = np.linspace(-1000.0, 1000.0, 4001, dtype=np.float32).reshape(1, 1, 4001)
    model = M.to_model_range(hu, "ct")
    assert model.min() >= -1.0 and model.max() <= 1.0
    back = M.from_model_range(model, "ct")
    assert np.abs(back - hu).max() < 1.0
    # torch too, through a float16 detour a model might take: still inside 1 HU? fp16 has ~1e-3 resolution
    # near 1.0, i.e. ~1 HU; fp32 must be far better.
    back_t = M.from_model_range(M.to_model_range(torch.from_numpy(hu), "ct"), "ct")
    assert (back_t - torch.from_numpy(hu)).abs().max().item() < 1e-2


def test_ct_outside_window_is_clipped_not_wrapped():
    out = M.to_model_range(np.array([-3000.0, 3000.0]), "ct")
    np.testing.assert_allclose(out, [-1.0, 1.0])


def test_xray_linear_map():
    np.testing.assert_allclose(M.to_model_range(np.array([0.0, 0.5, 1.0]), "xray"), [-1.0, 0.0, 1.0])
    np.testing.assert_allclose(M.from_model_range(np.array([-1.0, 0.0, 1.0]), "xray"), [0.0, 0.5, 1.0])


def test_mri_percentile_scaling_per_image_and_inverse():
    rng = np.random.default_rng(0)
    batch = np.stack([rng.gamma(2.0, 1.0, (32, 32)), 100.0 * rng.gamma(2.0, 1.0, (32, 32))]).astype(np.float32)
    scaled = M.to_model_range(batch, "mri_t2")
    # Each image is scaled on its own: the 100x brighter one looks the same in model range.
    for image in scaled:
        assert image.min() == pytest.approx(-1.0) and image.max() == pytest.approx(1.0)
        assert np.mean(image <= -1.0) == pytest.approx(0.005, abs=0.003)
    stats = M.get_modality("mri_t2").intensity.percentiles(batch)
    assert stats.shape == (2, 2)
    restored = M.from_model_range(scaled, "mri_t2", stats)
    inside = (batch >= stats[:, 0, None, None]) & (batch <= stats[:, 1, None, None])
    np.testing.assert_allclose(restored[inside], batch[inside], rtol=1e-4)
    # torch and numpy agree
    torch_scaled = M.to_model_range(torch.from_numpy(batch), "mri_t2").numpy()
    np.testing.assert_allclose(torch_scaled, scaled, atol=1e-4)


def test_constant_mri_image_does_not_divide_by_zero():
    out = M.to_model_range(np.full((8, 8), 3.0, dtype=np.float32), "mri_t1")
    assert np.isfinite(out).all()


def test_integer_input_is_promoted_not_truncated():
    out = M.to_model_range(np.array([0, 1], dtype=np.uint8), "xray")
    assert out.dtype.kind == "f"
    np.testing.assert_allclose(out, [-1.0, 1.0])


def test_text_has_no_intensity_map():
    with pytest.raises(ValueError, match="not an image"):
        M.to_model_range(np.zeros(3), "text")


def test_invalid_maps_rejected():
    with pytest.raises(ValueError, match="high must exceed low"):
        M.WindowIntensity(1.0, 1.0, "HU")
    with pytest.raises(ValueError, match="percentiles"):
        M.PercentileIntensity(99.0, 1.0)
