"""The finding classifier that judges generated images: model, labels, training and metrics."""

import json

import numpy as np
import pytest
import torch

from medm2g_diffusers.evaluation.finding_classifier import (
    MedM2GFindingClassifier,
    classifier_metrics,
    default_finding_types,
    default_input_windows,
    finding_examples,
    finding_labels,
)
from medm2g_diffusers.evaluation.train_finding_classifier import ClassifierAugmentation, train_finding_classifier

TYPES = ["left_blob", "right_blob"]
TINY = {"image_size": 16, "stem_channels": 4, "block_out_channels": [8, 8], "norm_num_groups": 4, "pool_size": 2}


def get_dummy_classifier(**overrides):
    torch.manual_seed(0)
    return MedM2GFindingClassifier(**{"modality": "ct", "finding_types": TYPES, **TINY, **overrides})


def blob_problem(n: int, seed: int):
    """16x16 noise images; a bright 4x4 blob in the left and/or right half, labelled by side."""
    rng = np.random.default_rng(seed)
    images = rng.normal(-0.5, 0.1, (n, 16, 16)).astype(np.float32)
    labels = rng.integers(0, 2, (n, 2)).astype(np.float32)
    for i in range(n):
        for side in range(2):
            if labels[i, side]:
                y, x = rng.integers(2, 10), rng.integers(1, 4) + 8 * side
                images[i, y : y + 4, x : x + 4] = 0.8
    return np.clip(images, -1, 1), labels


def test_forward_shapes_and_predictions():
    model = get_dummy_classifier()
    images = torch.rand(3, 1, 16, 16) * 2 - 1
    assert model(images).shape == (3, 2)
    probabilities = model.predict_probabilities(images.numpy()[:, 0])  # (B, H, W) is accepted too
    assert probabilities.shape == (3, 2) and probabilities.min() >= 0 and probabilities.max() <= 1
    predicted = model.predict_findings(images)
    assert len(predicted) == 3 and all(found <= set(TYPES) for found in predicted)
    expected = [{t for t, p in zip(TYPES, row) if p >= 0.5} for row in probabilities]
    assert predicted == expected


@pytest.mark.parametrize("shape", [(2, 16, 16), (2, 2, 16, 16), (2, 1, 32, 32)])
def test_forward_rejects_wrong_shapes(shape):
    with pytest.raises(ValueError, match="images must have shape"):
        get_dummy_classifier()(torch.zeros(shape))


def test_ct_windows_are_extra_input_channels():
    assert default_input_windows("xray") == [] and default_input_windows("mri_t1") == []
    np.testing.assert_allclose(default_input_windows("ct"), [[-0.02, 0.1], [-0.16, 0.24]], atol=1e-6)  # -20..100, -160..240 HU
    model = get_dummy_classifier(input_windows=default_input_windows("ct"), global_max_pool=True)
    assert model.conv_in.in_channels == 3 and model.classifier.in_features == 8 * (2 * 2 + 1)
    assert model(torch.zeros(2, 1, 16, 16)).shape == (2, 2)


def test_save_load_round_trip(tmp_path):
    model = get_dummy_classifier(threshold=0.3, input_windows=[[0.0, 0.2]], global_max_pool=True)
    images = torch.rand(2, 1, 16, 16) * 2 - 1
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = MedM2GFindingClassifier.from_pretrained(tmp_path)
    assert loaded.finding_types == TYPES and loaded.config.threshold == 0.3 and loaded.config.modality == "ct"
    assert loaded.config.input_windows == [[0.0, 0.2]] and loaded.config.global_max_pool
    with torch.no_grad():
        assert torch.equal(model(images), loaded(images))


def test_training_learns_sides_of_a_toy_problem():
    images, labels = blob_problem(256, seed=0)
    model = train_finding_classifier(
        images, labels, "xray", TYPES, steps=60, batch_size=32, lr=5e-3, seed=0, model_kwargs={k: v for k, v in TINY.items() if k != "image_size"}
    )
    test_images, test_labels = blob_problem(128, seed=1)
    metrics = classifier_metrics(model.predict_probabilities(test_images), test_labels, TYPES)
    assert metrics["exact_set_accuracy"] >= 0.9, metrics


def test_seeded_training_is_deterministic():
    images, labels = blob_problem(64, seed=0)
    kwargs = {"steps": 5, "batch_size": 16, "seed": 3, "model_kwargs": {k: v for k, v in TINY.items() if k != "image_size"}}
    first = train_finding_classifier(images, labels, "ct", TYPES, **kwargs).state_dict()
    second = train_finding_classifier(images, labels, "ct", TYPES, **kwargs).state_dict()
    other = train_finding_classifier(images, labels, "ct", TYPES, **{**kwargs, "seed": 4}).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_augmentation_keeps_sides_and_range():
    images = -torch.ones(8, 1, 16, 16)
    images[..., :8] = 0.9  # bright left half
    augmented = ClassifierAugmentation(max_shift=2, contrast=0.2, brightness=0.1, noise_std=0.05)(images, torch.Generator().manual_seed(0))
    assert augmented.shape == images.shape and augmented.min() >= -1 and augmented.max() <= 1
    assert (augmented[..., :6].mean(dim=(1, 2, 3)) > augmented[..., 10:].mean(dim=(1, 2, 3)) + 1).all()
    assert not torch.equal(augmented, images)


def test_classifier_metrics_against_hand_computed_values():
    truth = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    probabilities = np.array([[0.9, 0.2], [0.6, 0.7], [0.8, 0.1], [0.1, 0.4]])  # -> [1,0], [1,1], [1,0], [0,0]
    metrics = classifier_metrics(probabilities, truth, ["a", "b"])
    assert metrics["n"] == 4
    assert metrics["exact_set_accuracy"] == pytest.approx(0.5)
    assert metrics["label_accuracy"] == pytest.approx(6 / 8)
    a, b = metrics["per_type"]["a"], metrics["per_type"]["b"]
    assert (a["f1"], a["precision"], a["recall"], a["support"], a["predicted"]) == pytest.approx((0.8, 2 / 3, 1.0, 2, 3))
    assert (b["f1"], b["precision"], b["recall"], b["support"]) == pytest.approx((2 / 3, 1.0, 0.5, 2))
    assert metrics["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)
    as_sets = classifier_metrics([{"a"}, {"a", "b"}, {"a"}, set()], [{"a"}, {"b"}, {"a", "b"}, set()], ["a", "b"])
    assert as_sets == metrics


def test_classifier_metrics_leaves_undefined_f1_out_of_the_mean():
    metrics = classifier_metrics([{"a"}, set()], [{"a"}, set()], ["a", "never"])
    assert metrics["per_type"]["never"]["f1"] is None and metrics["per_type"]["never"]["accuracy"] == 1.0
    assert metrics["macro_f1"] == 1.0


def test_finding_labels_and_default_types():
    findings = [json.dumps([{"type": "nodule", "lobe": "RUL"}, {"type": "tumour"}]), "[]", [{"type": "pacemaker"}]]
    labels = finding_labels(findings, ["nodule", "pacemaker"])
    np.testing.assert_array_equal(labels, [[1, 0], [0, 0], [0, 1]])
    assert default_finding_types(["head"]) == ["tumour", "haemorrhage", "midline_shift"]
    assert "pleural_effusion" in default_finding_types(["chest"]) and "tumour" not in default_finding_types(["chest"])


def test_finding_examples_skips_missing_images_and_maps_units():
    from datasets import Array2D, Dataset, Features, Value

    image = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    split = Dataset.from_dict(
        {"findings": ['[{"type": "mass"}]', '[{"type": "mass"}]', "[]"], "xray": [image, None, image]},
        features=Features({"findings": Value("string"), "xray": Array2D((8, 8), "float32")}),
    )
    examples = finding_examples(split, "xray", ["mass"])
    np.testing.assert_array_equal(examples.rows, [0, 2])
    np.testing.assert_array_equal(examples.labels, [[1], [0]])
    np.testing.assert_allclose(examples.images[0], image * 2 - 1, atol=1e-6)
    # A selected view (indices over the same Arrow table) must be read through its indices.
    selected = finding_examples(split.select([1, 2, 0]), "xray", ["mass"])
    np.testing.assert_array_equal(selected.rows, [1, 2])
    np.testing.assert_array_equal(selected.labels, [[0], [1]])


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: get_dummy_classifier(modality="text"), "modality must be an image"),
        (lambda: get_dummy_classifier(modality="pet"), "modality must be one of"),
        (lambda: get_dummy_classifier(finding_types=["a", "a"]), "finding_types must not repeat"),
        (lambda: get_dummy_classifier(threshold=1.5), "threshold"),
        (lambda: get_dummy_classifier(input_windows=[[0.5, 0.2]]), "input_windows"),
        (lambda: get_dummy_classifier().predict_findings(np.full((1, 16, 16), -1000.0)), "model range"),
        (lambda: finding_labels(["not json"], ["a"]), r"findings\[0\]"),
        (lambda: train_finding_classifier(np.zeros((4, 8, 8)), np.zeros((4, 3)), "ct", ["a", "b"], steps=1), "labels must have shape"),
        (lambda: train_finding_classifier(np.full((4, 8, 8), 500.0), np.zeros((4, 1)), "ct", ["a"], steps=1), "model range"),
        (lambda: train_finding_classifier(np.zeros((4, 8, 8)), np.full((4, 1), 0.5), "ct", ["a"], steps=1), "labels must be 0/1"),
        (lambda: train_finding_classifier(np.zeros((4, 8, 8)), np.zeros((4, 1)), "ct", ["a"], steps=0), "steps"),
        (lambda: classifier_metrics(np.zeros((3, 2)), np.zeros((2, 2)), ["a", "b"]), "same length"),
        (lambda: classifier_metrics(np.zeros((2, 3)), np.zeros((2, 2)), ["a", "b"]), r"predictions must have shape"),
        (lambda: classifier_metrics([{"c"}], [{"a"}], ["a", "b"]), "outside finding_types"),
        (lambda: classifier_metrics(np.full((1, 2), 2.0), np.zeros((1, 2)), ["a", "b"]), r"\[0, 1\]"),
    ],
)
def test_bad_inputs_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
