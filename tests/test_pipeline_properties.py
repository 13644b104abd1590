"""Property-based tests of `MedM2GPipeline`'s inputs (hypothesis), on the tiny pipeline of `tiny_pipeline.py`.

The property, for every generated call: it either succeeds with outputs of the documented shape (finite,
display values in [0, 1]), or raises `ValueError`/`TypeError` whose message names the offending parameter.
Never another exception type, and never a silent coercion: a condition holding NaN/Inf (or complex values)
must be refused with a `ValueError` naming that condition.

Examples are derandomized (the same on every run) and not stored (`database=None`), and every test is
bounded by pytest-timeout, so a hang fails instead of stalling the suite.
"""

from __future__ import annotations

import math

import numpy as np
import PIL.Image
import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from medm2g_diffusers import MedM2GPipelineOutput
from medm2g_diffusers.modalities import modality_keys

from tiny_pipeline import SIZE, get_dummy_pipeline

PROMPT = "Large right pleural effusion. Heart size is normal."
LATENT_SCALE = 2  # the tiny VAE halves each side
TEXT_LATENT_DIM = 8
# (condition key, a target it can condition) in the tiny checkpoint.
DIRECTIONS = [("ct", "xray"), ("mri_t1", "ct"), ("mri_t2", "mri_t1"), ("xray", "text"), ("mri_pd", "mri_flair")]
OUTPUT_TYPES = ("pil", "np", "pt", "latent")

PROPERTY = settings(
    max_examples=25, deadline=None, derandomize=True, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TIMEOUT = pytest.mark.timeout(120)  # per test (all its examples); pytest-timeout fails a hang


def mostly(good, bad, odds: int = 3):
    """`good` about `odds` times as often as `bad`, so that both outcomes are well represented (hypothesis
    favours the ends of an integer range, so the split is drawn from 0..99, not 0..odds)."""
    return st.integers(0, 99).flatmap(lambda i: good if i >= 100 // (odds + 1) else bad)


@pytest.fixture(scope="module")
def pipe():
    return get_dummy_pipeline()


def call(pipe, blame: tuple[str, ...], **kwargs):
    """Run the pipeline; return its output, or None after a documented error that names one of `blame`.

    Any other exception propagates and fails the property.
    """
    kwargs.setdefault("num_inference_steps", 1)
    kwargs.setdefault("generator", torch.Generator().manual_seed(0))
    try:
        out = pipe(**kwargs)
    except (ValueError, TypeError) as e:
        message = str(e)
        assert any(name in message for name in blame), f"{type(e).__name__} does not name any of {blame}: {message}"
        event(f"refused: {message.split(';')[0].split(':')[0][:40]}")
        return None
    check_output(out, kwargs)
    event("generated")
    return out


def check_output(out, kwargs) -> None:
    """The documented output of a successful call."""
    assert isinstance(out, MedM2GPipelineOutput)
    targets, output_type = list(kwargs["targets"]), kwargs.get("output_type", "pil")
    batch = infer_batch(kwargs) * kwargs.get("num_images_per_prompt", 1)
    height, width = kwargs.get("height") or SIZE, kwargs.get("width") or SIZE
    assert set(out.provenance) == set(targets)
    for target in targets:
        if output_type == "latent":
            latent = out.images[target]
            expected = (batch, TEXT_LATENT_DIM, 1, 1) if target == "text" else (batch, 4, height // LATENT_SCALE, width // LATENT_SCALE)
            assert tuple(latent.shape) == expected and torch.isfinite(latent).all()
        elif target == "text":
            assert isinstance(out.text, list) and len(out.text) == batch and all(isinstance(t, str) for t in out.text)
        elif output_type == "np":
            image = out.images[target]
            assert isinstance(image, np.ndarray) and image.shape == (batch, height, width)
            assert np.isfinite(image).all() and image.min() >= 0.0 and image.max() <= 1.0
        elif output_type == "pt":
            image = out.images[target]
            assert isinstance(image, torch.Tensor) and tuple(image.shape) == (batch, 1, height, width)
            assert torch.isfinite(image).all() and image.min() >= 0.0 and image.max() <= 1.0
        else:
            images = out.images[target]
            assert isinstance(images, list) and len(images) == batch
            assert all(isinstance(i, PIL.Image.Image) and i.mode == "L" and i.size == (width, height) for i in images)


def infer_batch(kwargs) -> int:
    prompt = kwargs.get("prompt")
    if prompt is not None:
        return 1 if isinstance(prompt, str) else len(prompt)
    image = next(iter(kwargs["conditions"].values()))
    items = image if isinstance(image, (list, tuple)) else [image]
    return sum(item.shape[0] if getattr(item, "ndim", 0) == 4 else 1 for item in items)


# --------------------------------------------------------------------------------------------------
# Condition arrays: shapes, dtypes, NaN/Inf
# --------------------------------------------------------------------------------------------------

DTYPES = [np.bool_, np.int8, np.uint8, np.uint16, np.int32, np.float16, np.float32, np.float64,
          np.complex64, np.complex128, np.object_]
side = st.one_of(st.just(SIZE), st.integers(0, 40))
VALID_SHAPES = st.sampled_from([(SIZE, SIZE), (1, SIZE, SIZE), (1, 1, SIZE, SIZE), (2, 1, SIZE, SIZE)])
INVALID_SHAPES = st.one_of(
    st.just(()),                                                     # 0-d
    st.tuples(st.integers(0, 40)),                                   # 1-d
    st.just((SIZE, SIZE)), st.tuples(side, side),                    # 2-d, right or wrong size
    st.tuples(st.integers(0, 4), side, side),                        # 3-d, any channel count
    st.tuples(st.integers(0, 3), st.integers(0, 3), side, side),     # 4-d, any batch and channel count
)


def valid_shape(shape: tuple[int, ...]) -> bool:
    return (shape == (SIZE, SIZE) or shape == (1, SIZE, SIZE)
            or (len(shape) == 4 and shape[0] >= 1 and shape[1:] == (1, SIZE, SIZE)))


@st.composite
def condition_arrays(draw, dtype):
    dtype = np.dtype(dtype)
    shape = draw(mostly(VALID_SHAPES, INVALID_SHAPES, odds=1))
    if dtype.kind == "O":
        values = hnp.arrays(dtype, shape, elements=st.floats(-2000, 2000), fill=st.just(0.5))
    elif dtype.kind == "b":
        values = hnp.arrays(dtype, shape)
    elif dtype.kind in "iu":
        info = np.iinfo(dtype)
        values = hnp.arrays(dtype, shape, elements=st.integers(int(info.min), int(info.max)))
    else:  # moderate finite values; NaN/Inf are planted below, so that we know they are there
        values = hnp.arrays(dtype, shape, elements=st.floats(-2000, 2000, width=16 if dtype == np.float16 else 32))
    array = draw(values)
    planted = None
    if dtype.kind in "fc" and array.size and draw(st.integers(0, 2)) == 0:
        planted = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        array.flat[draw(st.integers(0, array.size - 1))] = planted
    return array, planted


@TIMEOUT
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@settings(PROPERTY, max_examples=6)
@given(data=st.data(), direction=st.sampled_from(DIRECTIONS),
       container=st.sampled_from(["numpy", "torch", "list"]), output_type=st.sampled_from(OUTPUT_TYPES))
def test_condition_arrays_give_the_documented_output_or_a_named_error(pipe, dtype, data, direction, container, output_type):
    array, planted = data.draw(condition_arrays(dtype), label="condition")
    key, target = direction
    if container == "torch":
        assume(array.dtype.kind != "O")  # torch has no object tensors; object arrays are covered as numpy
        image = torch.from_numpy(array.astype(np.int32) if array.dtype == np.uint16 else array)
    elif container == "list":
        image = [array, array]
    else:
        image = array
    out = call(pipe, ("conditions",), conditions={key: image}, targets=[target], output_type=output_type, max_new_tokens=4)
    real = array.dtype.kind in "biuf"
    if planted is not None or array.dtype.kind == "c":
        assert out is None, f"conditions[{key!r}] holding {planted if planted is not None else 'complex values'} was accepted"
    elif valid_shape(array.shape) and real:
        assert out is not None, "a valid condition was refused"
    if not valid_shape(array.shape) or array.dtype.kind == "O":
        assert out is None


@TIMEOUT
@PROPERTY
@given(value=st.sampled_from([np.nan, np.inf, -np.inf]), kind=st.sampled_from(["f16", "f32", "f64", "torch", "pil-F"]),
       direction=st.sampled_from(DIRECTIONS), where=st.integers(0, SIZE * SIZE - 1))
def test_nan_or_inf_in_a_condition_is_never_coerced(pipe, value, kind, direction, where):
    key, target = direction
    array = np.random.default_rng(where).random((SIZE, SIZE)).astype(np.float32)
    array.flat[where] = value
    image = {"f16": array.astype(np.float16), "f32": array, "f64": array.astype(np.float64),
             "torch": torch.from_numpy(array), "pil-F": PIL.Image.fromarray(array, mode="F")}[kind]
    with pytest.raises(ValueError, match=rf"conditions\[{key!r}\] has NaN or infinite values"):
        pipe(conditions={key: image}, targets=[target], num_inference_steps=1, output_type="np", max_new_tokens=4)


@TIMEOUT
@PROPERTY
@given(values=hnp.arrays(np.float64, (SIZE, SIZE), elements=st.floats(allow_nan=False, allow_infinity=False),
                         fill=st.floats(allow_nan=False, allow_infinity=False)),
       direction=st.sampled_from(DIRECTIONS))
def test_extreme_finite_conditions_give_finite_outputs_or_a_named_error(pipe, values, direction):
    """Finite values up to 1.8e308: beyond float32, or too large for MRI's percentile scaling, they are refused."""
    key, target = direction
    call(pipe, ("conditions",), conditions={key: values}, targets=[target], output_type="np", max_new_tokens=4)


# --------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------

WHITESPACE = st.text(alphabet=" \t\n\r\x0b\x0c\u00a0\u2003\u3000", max_size=20)
PROMPTS = st.one_of(
    st.text(max_size=200),                                                   # any unicode, control characters included
    WHITESPACE,                                                              # empty or whitespace-only
    st.text(alphabet=st.characters(max_codepoint=0x1F), min_size=1, max_size=20),  # control characters only
    st.sampled_from(["a" * 100_000, "effusion " * 11_000, "\u00e9" * 100_000]),   # huge
    st.just(PROMPT),
)


@TIMEOUT
@PROPERTY
@given(prompt=st.one_of(PROMPTS, st.lists(PROMPTS, min_size=0, max_size=3)),
       target=st.sampled_from(["xray", "ct", "mri_t2"]))
def test_any_prompt_gives_the_documented_output_or_a_named_error(pipe, prompt, target):
    out = call(pipe, ("prompt",), prompt=prompt, targets=[target], output_type="np")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not prompts or any(not p.strip() for p in prompts):
        assert out is None, "an empty or whitespace-only prompt was accepted"
    if prompt == PROMPT:
        assert out is not None


# --------------------------------------------------------------------------------------------------
# Modality keys
# --------------------------------------------------------------------------------------------------

VALID_KEYS = st.sampled_from(modality_keys())
KEYS = mostly(VALID_KEYS, st.one_of(st.sampled_from(["pet", "XRAY", "mri", "", "text "]), st.text(max_size=6),
                                    st.integers(), st.none()), odds=2)


@TIMEOUT
@PROPERTY
@given(targets=mostly(st.lists(KEYS, min_size=1, max_size=2, unique=True),
                      st.one_of(st.lists(st.one_of(KEYS, st.lists(KEYS, max_size=1)), max_size=3), KEYS, st.tuples(KEYS),
                                st.frozensets(VALID_KEYS, max_size=2))),
       condition_keys=mostly(st.just([]), st.lists(KEYS, max_size=2), odds=1), with_prompt=mostly(st.just(True), st.just(False)))
def test_unknown_modality_keys_are_named_errors(pipe, targets, condition_keys, with_prompt):
    conditions = {key: np.zeros((SIZE, SIZE), np.float32) for key in condition_keys}
    out = call(pipe, ("target", "condition", "prompt"), prompt=PROMPT if with_prompt else None,
               conditions=conditions or None, targets=targets, output_type="latent", max_new_tokens=4)
    known = set(modality_keys())
    listed = list(targets) if isinstance(targets, (list, tuple)) else None
    if listed is None or not listed or any(not isinstance(t, str) or t not in known for t in listed):
        assert out is None
    if any(not isinstance(k, str) or k not in known for k in conditions):
        assert out is None


# --------------------------------------------------------------------------------------------------
# Scalars: output_type, num_inference_steps, guidance_scale; generator lists
# --------------------------------------------------------------------------------------------------

BAD_STEPS = [0, -1, 1000, 10**6, 2**63, 1.0, 2.5, math.nan, True, False, "2", None, [1], np.float64(2.0)]
BAD_GUIDANCE = [-0.5, -1e-9, math.nan, math.inf, -math.inf, "2", [2.0], True, 1 + 2j, np.float32(2.5), np.int64(2),
                {"ct": 2.0}, {"xray": math.nan, "mri_flair": math.nan}, {"xray": "2"}]


@TIMEOUT
@PROPERTY
@given(output_type=mostly(st.sampled_from(OUTPUT_TYPES), st.sampled_from(["PIL", "numpy", "dicom", "", None, 3, ["np"]])),
       steps=mostly(st.integers(1, 2), st.sampled_from(BAD_STEPS)),
       guidance=mostly(st.one_of(st.floats(0, 20), st.sampled_from([0, 1, 3, np.float64(1.5), None])), st.sampled_from(BAD_GUIDANCE)),
       target=st.sampled_from(["xray", "mri_flair"]))
def test_bad_scalars_are_named_errors(pipe, output_type, steps, guidance, target):
    out = call(pipe, ("output_type", "num_inference_steps", "guidance_scale"), prompt=PROMPT, targets=[target],
               output_type=output_type, num_inference_steps=steps, guidance_scale=guidance)
    good_output = isinstance(output_type, str) and output_type in OUTPUT_TYPES
    good_steps = type(steps) is int and 1 <= steps <= 2
    # np.float64 is a float; np.float32/np.int64 are refused (they would not serialise into the provenance).
    good_scale = lambda g: isinstance(g, (int, float)) and not isinstance(g, bool) and math.isfinite(g) and g >= 0  # noqa: E731
    good_guidance = guidance is None or good_scale(guidance) or (
        isinstance(guidance, dict) and set(guidance) <= {target} and all(good_scale(g) for g in guidance.values()))
    assert (out is not None) == (good_output and good_steps and good_guidance), (output_type, steps, guidance)


@TIMEOUT
@PROPERTY
@given(batch=st.integers(1, 3), per_prompt=st.integers(1, 2), extra=mostly(st.just(0), st.integers(-6, 4)), by_conditions=st.booleans())
def test_generator_lists_must_have_one_generator_per_sample(pipe, batch, per_prompt, extra, by_conditions):
    generators = max(0, batch * per_prompt + extra)
    kwargs = ({"conditions": {"ct": np.zeros((batch, 1, SIZE, SIZE), np.float32)}} if by_conditions
              else {"prompt": [PROMPT] * batch})
    out = call(pipe, ("generator",), targets=["xray"], output_type="np", num_images_per_prompt=per_prompt,
               generator=[torch.Generator().manual_seed(i) for i in range(generators)], **kwargs)
    assert (out is not None) == (generators == batch * per_prompt)


# --------------------------------------------------------------------------------------------------
# Regressions: inputs that misbehaved before check_inputs/preprocess_condition were tightened
# --------------------------------------------------------------------------------------------------

_checker = np.where(np.indices((SIZE, SIZE)).sum(0) % 2, 3e38, -3e38).astype(np.float32)
REGRESSIONS = {
    # was: silently cast to real (torch warns "discards the imaginary part")
    "complex-numpy": ({"conditions": {"ct": np.zeros((SIZE, SIZE), np.complex128)}}, r"conditions\['ct'\] must hold real numbers"),
    "complex-torch": ({"conditions": {"ct": torch.zeros(SIZE, SIZE, dtype=torch.complex64)}}, r"conditions\['ct'\] must hold real numbers"),
    # was: TypeError "can't convert np.ndarray of type numpy.object_"
    "object": ({"conditions": {"ct": np.zeros((SIZE, SIZE), object)}}, r"conditions\['ct'\] must hold real numbers"),
    # was: RuntimeError "cannot reshape tensor of 0 elements" (CT) / from torch.quantile (MRI)
    "empty-batch-ct": ({"conditions": {"ct": np.zeros((0, 1, SIZE, SIZE))}}, r"conditions\['ct'\] is empty"),
    "empty-batch-mri": ({"conditions": {"mri_t2": np.zeros((0, 1, SIZE, SIZE))}, "targets": ["mri_t1"]}, r"conditions\['mri_t2'\] is empty"),
    # was: NaN images (percentile scaling overflows float32: inf / inf)
    "mri-near-float32-max": ({"conditions": {"mri_t2": _checker}, "targets": ["mri_t1"]}, r"conditions\['mri_t2'\] has values too large"),
    # was: "has NaN or infinite values" for a finite input
    "float64-beyond-float32": ({"conditions": {"ct": np.full((SIZE, SIZE), 1e300)}}, r"conditions\['ct'\] has values beyond the float32 range"),
    # was: NaN passed through np.clip into the model; inf silently clipped to 1
    "pil-F-nan": ({"conditions": {"ct": PIL.Image.fromarray(np.full((SIZE, SIZE), np.nan, np.float32), mode="F")}}, r"conditions\['ct'\] has NaN"),
    "pil-F-inf": ({"conditions": {"ct": PIL.Image.fromarray(np.full((SIZE, SIZE), np.inf, np.float32), mode="F")}}, r"conditions\['ct'\] has NaN"),
    # was: TypeError "unhashable type: 'list'"
    "unhashable-target": ({"prompt": PROMPT, "targets": [["xray"]]}, r"targets must be modality keys \(strings\)"),
    # was: True ran one step
    "steps-bool": ({"prompt": PROMPT, "num_inference_steps": True}, r"num_inference_steps must be an integer"),
    # was: IndexError in DDIMScheduler.step (steps_offset 1 makes the first timestep 1000 of 0..999)
    "steps-1000": ({"prompt": PROMPT, "num_inference_steps": 1000}, r"num_inference_steps must be an integer in \[1, 999\]"),
    # was: NaN silently disabled guidance; inf made NaN images; None/str raised an unnamed TypeError
    "guidance-nan": ({"prompt": PROMPT, "guidance_scale": math.nan}, r"guidance_scale must be a finite"),
    "guidance-inf": ({"prompt": PROMPT, "guidance_scale": math.inf}, r"guidance_scale must be a finite"),
    "guidance-dict-key": ({"prompt": PROMPT, "guidance_scale": {"ct": 2.0}}, r"guidance_scale keys must be targets"),
    "guidance-dict-nan": ({"prompt": PROMPT, "guidance_scale": {"xray": math.nan}}, r"guidance_scale must be a finite"),
    "guidance-str": ({"prompt": PROMPT, "guidance_scale": "2"}, r"guidance_scale must be a finite"),
    # was: ValueError "provenance must be JSON-serialisable" (np.float32 in the record) for PIL outputs
    "guidance-float32": ({"prompt": PROMPT, "guidance_scale": np.float32(2.0), "output_type": "pil"}, r"guidance_scale must be a finite"),
    # was: TypeError "'int' object is not iterable"
    "negative-prompt-int": ({"prompt": PROMPT, "negative_prompt": 3}, r"negative_prompt must be a string"),
    # was: TypeError from torch.repeat_interleave
    "images-per-prompt-bool": ({"prompt": PROMPT, "num_images_per_prompt": True}, r"num_images_per_prompt must be a positive integer"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", sorted(REGRESSIONS))
def test_inputs_found_by_the_properties_are_named_value_errors(pipe, name):
    kwargs, match = REGRESSIONS[name]
    kwargs = {"targets": ["xray"], "num_inference_steps": 1, "output_type": "np", **kwargs}
    with pytest.raises(ValueError, match=match):
        pipe(**kwargs)


@pytest.mark.parametrize("generator", [5, "seed", [torch.Generator(), 3], np.random.default_rng(0)])
@pytest.mark.parametrize("batch_invariant", [False, True])
def test_a_generator_that_is_not_a_torch_generator_is_a_named_error(pipe, generator, batch_invariant):
    with pytest.raises(ValueError, match="generator must be a torch.Generator"):
        pipe(prompt="Effusion.", targets=["xray"], num_inference_steps=1, generator=generator, batch_invariant=batch_invariant)
