"""The Gradio demo (space/app.py) without a browser: uploads, the generation handlers, Stop, `medm2g demo`
and the Space files. Handlers are called as Gradio calls them: as generators, resumed step by step."""

from __future__ import annotations

import re
import subprocess
import threading
import time
import tomllib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
from space_app import load_app

gr = pytest.importorskip("gradio", reason="the demo extra is not installed (pip install -e '.[demo]')")

from medm2g_diffusers import MedM2GPipeline
from medm2g_diffusers.data.io import (
    read_provenance,
    write_dicom,
    write_nifti,
    write_png,
)

ROOT = Path(__file__).resolve().parents[1]
STEPS = 2


@pytest.fixture(scope="module")
def app():
    return load_app()


@pytest.fixture(scope="module")
def pipe():
    from tiny_pipeline import get_dummy_components

    return MedM2GPipeline(**get_dummy_components())


@pytest.fixture(scope="module")
def demo(app, pipe, tmp_path_factory):
    return app.build_demo(pipe, model_name="tiny-test", examples_dir=tmp_path_factory.mktemp("examples"))


def handler(demo, api_name: str):
    return next(f.fn for f in demo.fns.values() if f.api_name == api_name)


def run_to_result(generator):
    """Resumes a handler like Gradio until its final outputs (a tuple), and returns them with the still
    open generator (its temporary files live until it is resumed again)."""
    for item in generator:
        if isinstance(item, tuple):
            return item, generator
    raise AssertionError("the handler finished without outputs")


# ------------------------------------------------------------------------------------------- uploads


def test_read_upload_reads_dicom_nifti_png_in_native_units_and_resizes(app, tmp_path):
    ct = np.linspace(-1000, 1000, 48 * 40, dtype=np.float32).reshape(48, 40)
    write_dicom(tmp_path / "ct.dcm", ct, modality="ct", provenance={"model": "test"})
    array, note = app.read_upload(tmp_path / "ct.dcm", "ct", 32)
    assert array.shape == (32, 32) and array.min() < -900 and array.max() > 900  # HU, not [0, 1]
    assert "resized from 48×40 to 32×32" in note and str(tmp_path) not in note
    _, note = app.read_upload(tmp_path / "ct.dcm", "xray", 32)
    assert "ct.dcm says it is CT, but it was read as chest X-ray." in note

    write_nifti(tmp_path / "t1.nii.gz", np.random.default_rng(0).random((32, 32)) * 800, provenance={"model": "test"})
    array, note = app.read_upload(tmp_path / "t1.nii.gz", "mri_t1", 32)
    assert array.shape == (32, 32) and array.max() > 1 and note == ""

    write_png(tmp_path / "ct.png", np.full((32, 32), 0.75), provenance={"model": "test"})
    array, _ = app.read_upload(tmp_path / "ct.png", "ct", 32)
    assert np.allclose(array, 500.0, atol=5)  # a CT PNG is the window [-1000, 1000] HU


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.dcm", b"", r"empty\.dcm is empty"),
        ("corrupt.dcm", b"\0" * 128 + b"DICM" + b"garbage" * 20, r"corrupt\.dcm"),
        ("scan.png", b"not a png at all", r"scan\.png is not a PNG file"),
        ("notes.txt", b"FINDINGS: none.", r"notes\.txt has unsupported file type '\.txt'"),
    ],
)
def test_read_upload_rejects_bad_files_with_a_message_naming_the_file(app, tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(gr.Error, match=message) as error:
        app.read_upload(path, "xray", 32)
    assert str(tmp_path) not in error.value.message  # the user's file name, not the server's path


def test_read_upload_rejects_huge_files_before_reading_them(app, tmp_path):
    path = tmp_path / "huge.dcm"
    with path.open("wb") as f:
        f.truncate(app.MAX_UPLOAD_BYTES + 1)  # sparse: no disk used
    with pytest.raises(gr.Error, match=r"huge\.dcm is 50\.0 MB; the limit is 50 MB"):
        app.read_upload(path, "ct", 32)
    with pytest.raises(gr.Error, match="Upload a CT image"):
        app.read_upload(None, "ct", 32)


# -------------------------------------------------------------------------------------------- the app


def test_demo_has_a_tab_per_task_a_banner_and_one_api_per_task(app, demo):
    html = [c["props"].get("value") or "" for c in demo.config["components"] if c["type"] == "html"]
    assert any(app.BANNER in value for value in html)
    assert app.BANNER == "Research demo — synthetic images — not for clinical use"
    tabs = {c["props"].get("id") for c in demo.config["components"] if c["type"] == "tabitem"}
    assert tabs == set(app.TABS)
    public = {f.api_name for f in demo.fns.values() if f.api_visibility == "public"}
    assert public == set(app.TABS)
    generation = [f for f in demo.fns.values() if f.api_name in app.TABS]
    assert {f.concurrency_id for f in generation} == {"model"} and {f.concurrency_limit for f in generation} == {1}


def test_examples_are_phantom_files_in_every_format(app, tmp_path):
    examples = app.write_examples(tmp_path, 32)
    assert "FINDINGS:" in examples["chest_report"] and "FINDINGS:" in examples["head_report"]
    for name in ("chest_xray.dcm", "chest_xray.png", "chest_ct.dcm", "chest_ct.nii.gz", "head_mri_t1.nii.gz", "head_mri_t2.dcm"):
        assert Path(examples[name]).is_file()
        assert str(read_provenance(examples[name]).get("synthetic")).lower() == "true"
    ct, _ = app.read_upload(examples["chest_ct.dcm"], "ct", 32)
    assert ct.min() < -500  # air in HU survives the DICOM round trip


def test_report_to_images_writes_synthetic_png_and_dicom_per_target(demo):
    fn = handler(demo, "report_to_images")
    (gallery, files, status), generator = run_to_result(
        fn("FINDINGS: Small left pleural effusion. IMPRESSION: Effusion.", ["xray", "ct"], STEPS, 2.0, 7)
    )
    assert [caption for _, caption in gallery] == ["chest X-ray (synthetic)", "CT (synthetic)"]
    assert sorted(Path(f).name for f in files) == ["ct_seed7.dcm", "ct_seed7.png", "xray_seed7.dcm", "xray_seed7.png"]
    for path in files:
        provenance = read_provenance(path)
        assert provenance["seed"] == 7 and provenance["app"] == "medm2g demo" and str(provenance["synthetic"]).lower() == "true"
    ct = pydicom.dcmread(next(f for f in files if f.endswith("ct_seed7.dcm")))
    assert "SYNTHETIC" in ct.SeriesDescription and ct.PatientName == "ANONYMOUS^SYNTHETIC" and ct.Modality == "CT"
    assert "Generated chest X-ray + CT" in status and f"{STEPS} steps" in status and "seed 7" in status
    generator.close()
    assert not any(Path(f).exists() for f in files)  # the request's temporary folder is gone


def test_same_seed_same_images_and_requests_do_not_share_generators(demo):
    fn = handler(demo, "report_to_images")
    prompt = "FINDINGS: Large right pleural effusion. IMPRESSION: Effusion."
    first, g1 = run_to_result(fn(prompt, ["xray"], STEPS, 2.0, 3))
    other, g2 = run_to_result(fn(prompt, ["xray"], STEPS, 2.0, 4))
    again, g3 = run_to_result(fn(prompt, ["xray"], STEPS, 2.0, 3))
    pixels = [np.asarray(result[0][0][0]) for result in (first, other, again)]
    assert np.array_equal(pixels[0], pixels[2]) and not np.array_equal(pixels[0], pixels[1])
    for g in (g1, g2, g3):
        g.close()


def test_image_tabs_generate_from_example_files(demo, app, tmp_path):
    files = app.write_examples(tmp_path, 32)
    report, generator = run_to_result(handler(demo, "image_to_report")(files["chest_xray.dcm"], "xray", STEPS, 2.0, 0))
    assert isinstance(report[0], str) and [Path(f).suffix for f in report[1]] == [".txt", ".json"]
    assert Path(report[1][0]).read_text().startswith("SYNTHETIC REPORT")
    generator.close()
    for api, inputs, target in [
        ("mri_to_ct", (files["head_mri_t1.nii.gz"], "mri_t1"), "ct"),
        ("ct_to_xray", (files["chest_ct.dcm"],), "xray"),
        ("mri_synthesis", ("mri_t1", None, files["head_mri_t2.dcm"], files["head_mri_pd.nii.gz"], None), "mri_t1"),
    ]:
        (image, outputs, _), generator = run_to_result(handler(demo, api)(*inputs, STEPS, 2.0, 0))
        assert image.size == (32 * app.DISPLAY_ZOOM, 32 * app.DISPLAY_ZOOM)
        assert sorted(Path(f).name for f in outputs) == [f"{target}_seed0.dcm", f"{target}_seed0.png"]
        generator.close()


def test_mri_synthesis_uses_several_sources_and_never_the_target(demo, app, tmp_path):
    files = app.write_examples(tmp_path, 32)
    fn = handler(demo, "mri_synthesis")
    (_, _, status), generator = run_to_result(
        fn("mri_t1", files["head_mri_t1.nii.gz"], files["head_mri_t2.dcm"], files["head_mri_pd.nii.gz"], None, STEPS, 2.0, 0)
    )
    assert "Sources: MRI T2-weighted, MRI proton density." in status and "upload was not used" in status
    generator.close()
    with pytest.raises(gr.Error, match="other than the target"):
        next(fn("mri_t1", files["head_mri_t1.nii.gz"], None, None, None, STEPS, 2.0, 0))


def test_pipeline_input_errors_become_messages(demo):
    with pytest.raises(gr.Error, match="Write a report"):
        next(handler(demo, "report_to_images")("  ", ["xray"], STEPS, 2.0, 0))
    with pytest.raises(gr.Error, match="max_text_tokens"):  # the pipeline's own ValueError, as a message
        next(handler(demo, "report_to_images")("effusion " * 400, ["xray"], STEPS, 2.0, 0))


# ---------------------------------------------------------------------------------------------- stop


class CountingPipe:
    """Wraps a pipeline and records how many denoising steps each call ran."""

    def __init__(self, pipe):
        self.pipe, self.steps = pipe, []

    def __call__(self, callback_on_step_end, **kwargs):
        def counting(p, step, t, callback_kwargs):
            self.steps[-1] = step + 1
            return callback_on_step_end(p, step, t, callback_kwargs)

        self.steps.append(0)
        return self.pipe(callback_on_step_end=counting, **kwargs)


def _wait_free(lock: threading.Lock) -> float:
    started = time.perf_counter()
    assert lock.acquire(timeout=30), "the model was not freed"
    lock.release()
    return time.perf_counter() - started


def test_stop_flag_ends_a_running_generation_after_the_current_step(app, pipe):
    counting, lock, flag = CountingPipe(pipe), threading.Lock(), threading.Event()
    generator = app.run_pipeline(counting, lock, flag, lambda *a, **k: None, 50, prompt="Effusion.", targets=["xray"])
    next(generator)  # one step done
    flag.set()  # the Stop button
    with pytest.raises(StopIteration) as finished:
        while True:
            next(generator)
    assert finished.value.value is None  # stopped: no output
    _wait_free(lock)
    assert 1 <= counting.steps[-1] < 50


def test_closing_the_generator_frees_the_model(app, pipe):
    """What Gradio does when the page is closed or an API client cancels its job."""
    counting, lock = CountingPipe(pipe), threading.Lock()
    generator = app.run_pipeline(counting, lock, threading.Event(), lambda *a, **k: None, 50, prompt="Effusion.", targets=["xray"])
    next(generator)
    generator.close()
    _wait_free(lock)
    assert counting.steps[-1] < 50


def test_stop_requests_find_the_queued_or_running_job_of_the_same_page_and_tab(app):
    stops = app.StopRequests()
    page, tab = "session-a", "report_to_images"
    stops.stop((page, tab))  # nothing queued or running: ignored
    stops.submitted((page, tab))
    flag = stops.start((page, tab))
    assert not flag.is_set()  # the earlier Stop did not carry over
    stops.finish((page, tab), flag)

    stops.submitted((page, tab))
    stops.stop((page, tab))  # pressed while the job waits for the model
    flag = stops.start((page, tab))
    assert flag.is_set()
    stops.finish((page, tab), flag)

    with stops.request(SimpleNamespace(session_hash=page), tab) as running:
        stops.stop(("session-b", tab))  # another page's Stop
        stops.stop((page, "mri_to_ct"))  # another tab's Stop
        assert not running.is_set()
        stops.stop((page, tab))
        assert running.is_set()
    with stops.request(None, tab) as unregistered:  # a direct call without a Gradio request
        assert not unregistered.is_set()


# ------------------------------------------------------------------------------ CLI and Space files


def test_medm2g_demo_starts_space_app_with_the_environment_s_host_and_port(monkeypatch, pipe):
    from medm2g_diffusers import cli

    launched = {}

    def fake_launch(self, **kwargs):
        launched.update(kwargs)

    monkeypatch.setattr(cli, "load_pipeline", lambda model, revision=None: pipe)
    monkeypatch.setattr(gr.Blocks, "launch", fake_launch)
    assert cli.main(["demo"]) == 0
    # None lets Gradio read GRADIO_SERVER_NAME / GRADIO_SERVER_PORT itself.
    assert launched["server_name"] is None and launched["server_port"] is None
    assert launched["max_file_size"] == 50 * 1024 * 1024 and launched["ssr_mode"] is False
    assert cli.main(["demo", "--server-name", "0.0.0.0", "--server-port", "7999"]) == 0
    assert (launched["server_name"], launched["server_port"]) == ("0.0.0.0", 7999)


def test_space_card_and_requirements(app):
    card = (ROOT / "space" / "README.md").read_text()
    header = re.match(r"---\n(.*?)\n---\n", card, re.DOTALL).group(1)
    import yaml

    meta = yaml.safe_load(header)
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py" and meta["license"] == "apache-2.0"
    assert meta["sdk_version"] == gr.__version__ and meta["tags"] and len(meta["short_description"]) <= 60
    assert "not for clinical use" in card
    # The Space installs its requirements before it has the package, so they repeat pyproject's; keep them equal.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    lines = [line.split("#")[0].strip() for line in (ROOT / "space" / "requirements.txt").read_text().splitlines()]
    requirements = [line for line in lines if line and not line.startswith("-")]
    assert sorted(requirements) == sorted(pyproject)


def test_assemble_writes_a_space_folder(tmp_path):
    subprocess.run(["bash", str(ROOT / "space" / "assemble.sh"), str(tmp_path / "space")], check=True, capture_output=True)
    out = tmp_path / "space"
    for name in ("app.py", "README.md", "requirements.txt", "src/medm2g_diffusers/cli.py", "checkpoints/medm2g-tiny/model_index.json"):
        assert (out / name).is_file(), name
    assert not list(out.rglob("__pycache__"))
