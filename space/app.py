"""MedM2G in the browser: the Gradio demo and Hugging Face Space app.

``python space/app.py`` or ``medm2g demo`` starts it; Gradio reads ``GRADIO_SERVER_NAME`` and
``GRADIO_SERVER_PORT``, and ``MEDM2G_MODEL`` names the checkpoint (default: the bundled ``medm2g-tiny``).
It runs offline: the model is read from disk once at startup, analytics are off, and the page's fonts
and scripts come from the installed Gradio package.

One tab per task: report -> images (several targets are generated jointly), image -> report, MRI -> CT,
CT -> X-ray and MRI contrast synthesis from several sources. Every request builds its own random
generator, temporary folder and stop flag; what requests share is the model and a lock around it, and
generation events share one queue slot (see docs/decisions.md, "The demo").
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# Before Gradio is imported: it reads these at import and at Blocks() time.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import gradio as gr
import numpy as np
import torch
from PIL import Image

try:
    import medm2g_diffusers  # noqa: F401
except ModuleNotFoundError:  # a Space holds the package's src/ beside this file (space/assemble.sh)
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from medm2g_diffusers.checkpoints import DEFAULT_CHECKPOINT
from medm2g_diffusers.data.datasets import native_units, to_square
from medm2g_diffusers.data.io import (
    MedicalImageError,
    read_image,
    write_dicom,
    write_nifti,
    write_png,
)
from medm2g_diffusers.data.phantoms import PhantomGenerator
from medm2g_diffusers.modalities import CT_WINDOW_HU, MODALITIES, to_model_range
from medm2g_diffusers.pipelines.pipeline_medm2g import DEFAULT_GUIDANCE_SCALES

logger = logging.getLogger("medm2g.demo")

BANNER = "Research demo — synthetic images — not for clinical use"
MAX_UPLOAD_BYTES = 50 * 1024 * 1024
"""Largest accepted upload; Gradio refuses bigger files at upload time, and the reader checks again."""
MAX_STEPS = 100
DEFAULT_STEPS = 25
DISPLAY_ZOOM = 4
"""Outputs are shown enlarged (nearest neighbour) so 64 px pixels stay visible; downloads keep their size."""
STOPPED = "Stopped; nothing was generated."
EXAMPLE_SEED = 12345
"""Phantom seed of the example patients: not the seed-0 patients medm2g-tiny trained on."""

IMAGE_KEYS = ["xray", "ct", "mri_t1", "mri_t2", "mri_pd", "mri_flair"]
MRI_KEYS = ["mri_t1", "mri_t2", "mri_pd", "mri_flair"]
TABS = {
    "report_to_images": "Report → images",
    "image_to_report": "Image → report",
    "mri_to_ct": "MRI → CT",
    "ct_to_xray": "CT → X-ray",
    "mri_synthesis": "MRI contrast synthesis",
}


def label(key: str) -> str:
    return MODALITIES[key].description


# ----------------------------------------------------------------------------------------- uploads


def read_upload(path: str | os.PathLike | None, key: str, size: int) -> tuple[np.ndarray, str]:
    """An uploaded DICOM/NIfTI/PNG/JPEG as a ``(size, size)`` condition in ``key``'s native units.

    Returns the array and a note for the user ("" or how it was resized). Every problem with the file
    becomes a ``gr.Error`` that names the file as the user called it, never a server path or a traceback
    (the user's file is at fault, so none is logged either; a reader bug is logged, see below).
    """
    if path is None:
        raise gr.Error(f"Upload a {label(key)} image (DICOM, NIfTI or PNG) or pick an example first.")
    path = Path(path)
    name = path.name
    try:
        nbytes = path.stat().st_size
    except OSError:
        raise gr.Error(f"{name} could not be read; upload it again.", print_exception=False) from None
    if nbytes > MAX_UPLOAD_BYTES:
        raise gr.Error(f"{name} is {nbytes / 2**20:.1f} MB; the limit is {MAX_UPLOAD_BYTES // 2**20} MB.",
                       print_exception=False)
    try:
        image = read_image(path)
        array = native_units(image, key, CT_WINDOW_HU)
    except (MedicalImageError, ValueError) as error:
        raise gr.Error(str(error).replace(str(path), name), print_exception=False) from None
    except Exception:  # a corrupt file the reader did not anticipate (e.g. a mangled DICOM transfer syntax UID)
        logger.exception("reading an upload failed unexpectedly")
        raise gr.Error(f"{name} could not be read as a DICOM, NIfTI, PNG or JPEG image; it may be corrupt.",
                       print_exception=False) from None
    notes = []
    if image.modality is not None and image.modality != MODALITIES[key].family:
        notes.append(f"{name} says it is {image.modality.upper()}, but it was read as {label(key)}.")
    if array.shape != (size, size):
        notes.append(f"{name}: resized from {array.shape[0]}×{array.shape[1]} to {size}×{size} (padded to square).")
        array = to_square(array, size)
    return array, " ".join(notes)


def condition_preview(array: np.ndarray, key: str) -> Image.Image:
    """What the model sees of a condition: its model range [-1, 1] shown as grey levels."""
    display = (np.clip(np.asarray(to_model_range(array, key), dtype=np.float32), -1.0, 1.0) + 1.0) / 2.0
    return enlarge(display)


def enlarge(display: np.ndarray) -> Image.Image:
    """A [0, 1] image as an 8-bit grey PIL image, enlarged by DISPLAY_ZOOM with nearest-neighbour pixels."""
    image = Image.fromarray(np.rint(np.clip(display, 0.0, 1.0) * 255).astype(np.uint8), mode="L")
    return image.resize((image.width * DISPLAY_ZOOM, image.height * DISPLAY_ZOOM), Image.NEAREST)


# -------------------------------------------------------------------------------------- generation


class _Stopped(Exception):
    """Raised in the step callback of a generation that was asked to stop."""


class StopRequests:
    """Which generation a Stop press is for: the running or queued one of this page's tab.

    Keys are ``(session_hash, tab)``. Generate first records the submission (an unqueued event, done before
    the generation joins the queue), so a Stop pressed while the job still waits for the model stops it as
    soon as it starts; a running job gets its stop flag set and ends after the current step.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queued: set[tuple[str, str]] = set()
        self._cancelled: set[tuple[str, str]] = set()
        self._running: dict[tuple[str, str], threading.Event] = {}

    def submitted(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._queued.add(key)
            self._cancelled.discard(key)

    def stop(self, key: tuple[str, str]) -> None:
        with self._lock:
            if key in self._running:
                self._running[key].set()
            elif key in self._queued:
                self._cancelled.add(key)

    def start(self, key: tuple[str, str] | None) -> threading.Event:
        """A new stop flag for the generation now starting (already set if Stop came while it was queued)."""
        flag = threading.Event()
        if key is not None:
            with self._lock:
                self._queued.discard(key)
                if key in self._cancelled:
                    self._cancelled.discard(key)
                    flag.set()
                self._running[key] = flag
        return flag

    def finish(self, key: tuple[str, str] | None, flag: threading.Event) -> None:
        with self._lock:
            if key is not None and self._running.get(key) is flag:
                del self._running[key]

    @contextmanager
    def request(self, request: gr.Request | None, tab: str) -> Iterator[threading.Event]:
        """The stop flag of one generation request, registered while it runs (no request: unregistered)."""
        session = getattr(request, "session_hash", None)
        key = (session, tab) if session else None
        flag = self.start(key)
        try:
            yield flag
        finally:
            self.finish(key, flag)


def run_pipeline(pipe, lock: threading.Lock, stop: threading.Event, progress: gr.Progress, steps: int, **kwargs) -> Iterator[Any]:
    """Runs ``pipe(**kwargs)`` in a worker thread, yields ``gr.skip()`` after every denoising step and
    returns the pipeline output, or ``None`` when ``stop`` was set (use it with ``yield from``).

    The worker checks ``stop`` after every step. It is set by the Stop button, and by the ``finally`` below
    when Gradio closes this generator (a closed page, an API client's ``job.cancel()``); the per-step
    yields are where such a close lands. Either way the model is free again within one step.
    """
    events: queue.Queue = queue.Queue()
    done = 0

    def on_step(_pipe, step: int, _timestep, callback_kwargs: dict) -> dict:
        nonlocal done
        if stop.is_set():
            raise _Stopped
        done = step + 1
        events.put(("step", done))
        return callback_kwargs

    def work() -> None:
        try:
            with lock:
                if stop.is_set():
                    raise _Stopped
                result = pipe(num_inference_steps=steps, callback_on_step_end=on_step, **kwargs)
            events.put(("done", result))
        except _Stopped:
            logger.info("generation stopped after %d/%d steps", done, steps)
            events.put(("stopped", done))
        except Exception as error:  # handed to the request's own thread, which reports it
            events.put(("error", error))

    progress(0, desc="Waiting for the model")
    worker = threading.Thread(target=work, name="medm2g-demo-generation", daemon=True)
    worker.start()
    try:
        while True:
            kind, value = events.get()
            if kind == "step":
                progress((value, steps), desc="Denoising", unit="steps")
                yield gr.skip()
            elif kind == "done":
                return value
            elif kind == "stopped":
                return None
            elif isinstance(value, ValueError):  # the pipeline's input checks: the user's to fix
                raise gr.Error(str(value))
            else:
                raise value
    finally:
        stop.set()


def _in_gradio_cache(path: Path) -> bool:
    """Whether ``path`` lies in Gradio's file cache (GRADIO_TEMP_DIR, default ``<temp folder>/gradio``)."""
    cache = os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio"  # gradio.utils.get_upload_folder
    return Path(path).resolve().is_relative_to(Path(cache).resolve())


@contextmanager
def request_folder() -> Iterator[Path]:
    """A new folder in the temp folder for one request's downloads (whose names the app chooses).

    Gradio copies returned files into its cache before it resumes the handler, so the folder is removed
    then. Except when the temp folder lies in Gradio's cache (GRADIO_TEMP_DIR set to the temp folder
    itself): Gradio then serves the files where they are, so removing them would break the download links
    (HTTP 403); they stay, and Gradio's ``delete_cache`` removes them with the rest of its cache.
    """
    folder = Path(tempfile.mkdtemp(prefix="medm2g-demo-"))
    try:
        yield folder
    finally:
        if not _in_gradio_cache(folder):
            shutil.rmtree(folder, ignore_errors=True)


def save_images(output, folder: Path, extra: dict[str, Any]) -> tuple[list[tuple[Image.Image, str]], list[str]]:
    """Gallery items and PNG + DICOM files (both marked synthetic) for every image in a pipeline output
    made with ``output_type="np", ct_in_hu=True``."""
    gallery, files = [], []
    for target, images in output.images.items():
        image = np.asarray(images[0], dtype=np.float32)
        provenance = {**output.provenance[target], **extra}
        if target == "ct":
            low, high = CT_WINDOW_HU
            display = np.clip((image - low) / (high - low), 0.0, 1.0)
        else:
            display = np.clip(image, 0.0, 1.0)
        stem = f"{target}_seed{provenance['seed']}"
        write_png(folder / f"{stem}.png", display, provenance=provenance)
        write_dicom(folder / f"{stem}.dcm", image if target == "ct" else display, modality=target, provenance=provenance)
        files += [str(folder / f"{stem}.png"), str(folder / f"{stem}.dcm")]
        gallery.append((enlarge(display), f"{label(target)} (synthetic)"))
    return gallery, files


def save_report(report: str, provenance: dict[str, Any], folder: Path) -> list[str]:
    """The report as text with a SYNTHETIC header, and as JSON with its provenance."""
    stem = folder / f"report_seed{provenance['seed']}"
    stem.with_suffix(".txt").write_text(f"SYNTHETIC REPORT generated by {provenance['model']} - not for clinical use.\n\n{report}\n")
    stem.with_suffix(".json").write_text(json.dumps({"report": report, "provenance": {"synthetic": True, **provenance}}, indent=2))
    return [str(stem.with_suffix(".txt")), str(stem.with_suffix(".json"))]


def summary(what: str, seconds: float, steps: int, guidance: float, seed: int, model: str, notes: list[str]) -> str:
    line = f"Generated {what} in {seconds:.1f} s · {steps} steps · guidance {guidance:g} · seed {seed} · {model}."
    return "\n\n".join([f"{line} Synthetic — not for clinical use.", *(note for note in notes if note)])


# ---------------------------------------------------------------------------------------- examples


def write_examples(folder: Path, size: int) -> dict[str, Any]:
    """Example inputs from the phantom generator: a chest and a head patient with findings, as DICOM,
    NIfTI and PNG files (synthetic, marked so) and their reports."""
    generator = PhantomGenerator(seed=EXAMPLE_SEED, size=size)
    patients = {}
    for anatomy in ("chest", "head"):
        patients[anatomy] = next(
            p for p in (generator.patient(i, anatomy=anatomy) for i in range(100)) if not p.is_normal
        )
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}

    def provenance(patient) -> dict[str, Any]:
        return {"model": "medm2g phantom generator", "patient_id": patient.patient_id, "size": size}

    chest, head = patients["chest"], patients["head"]
    files["chest_xray.dcm"] = chest.images["xray"]
    files["chest_xray.png"] = chest.images["xray"]
    files["chest_ct.dcm"] = chest.images["ct"]
    files["chest_ct.nii.gz"] = chest.images["ct"]
    files["head_ct.dcm"] = head.images["ct"]
    for key in MRI_KEYS:
        files[f"head_{key}.nii.gz"] = head.images[key]
        files[f"head_{key}.dcm"] = head.images[key]
    paths: dict[str, Any] = {}
    for name, array in files.items():
        path = folder / name
        patient = chest if name.startswith("chest") else head
        key = name.split("_", 1)[1].split(".")[0]
        if name.endswith(".png"):
            write_png(path, np.clip(array, 0.0, 1.0), provenance=provenance(patient))
        elif name.endswith(".nii.gz"):
            write_nifti(path, array, provenance=provenance(patient))
        else:
            if key.startswith("mri_"):  # the MRI DICOM writer stores [0, 1]; any scale is valid MRI signal
                values = np.clip(array / max(float(array.max()), 1e-6), 0.0, 1.0)
            else:
                values = array if key == "ct" else np.clip(array, 0.0, 1.0)
            write_dicom(path, values, modality=key, provenance=provenance(patient))
        paths[name] = str(path)
    paths["chest_report"], paths["head_report"] = chest.report, head.report
    return paths


# ---------------------------------------------------------------------------------------------- UI


def _settings(prefix: str) -> tuple[gr.Slider, gr.Slider, gr.Slider]:
    # The pipeline's own defaults: reports are guided harder than images (docs/results/report-guidance.md).
    default_guidance = DEFAULT_GUIDANCE_SCALES["text" if prefix == "image_to_report" else "image"]
    with gr.Row():
        steps = gr.Slider(1, MAX_STEPS, value=DEFAULT_STEPS, step=1, label="Inference steps", elem_id=f"{prefix}-steps")
        guidance = gr.Slider(0.0, 10.0, value=default_guidance, step=0.1, label="Guidance scale", elem_id=f"{prefix}-guidance")
        seed = gr.Slider(0, 99999, value=0, step=1, label="Seed", elem_id=f"{prefix}-seed")
    return steps, guidance, seed


def _buttons(prefix: str) -> tuple[gr.Button, gr.Button]:
    with gr.Row():
        run = gr.Button("Generate", variant="primary", elem_id=f"{prefix}-run")
        stop = gr.Button("Stop", variant="stop", elem_id=f"{prefix}-stop")
    return run, stop


def _upload(key_label: str, elem_id: str, hint: bool = True) -> tuple[gr.File, gr.Image]:
    hint_text = f" (DICOM, NIfTI or PNG, ≤ {MAX_UPLOAD_BYTES // 2**20} MB)" if hint else ""
    upload = gr.File(label=key_label + hint_text, type="filepath", elem_id=elem_id)
    preview = gr.Image(label="What the model sees", type="pil", format="png", interactive=False, height=200, elem_id=f"{elem_id}-preview")
    return upload, preview


def _downloads(prefix: str) -> gr.File:
    return gr.File(label="Download (PNG and DICOM, marked synthetic)", file_count="multiple", interactive=False, elem_id=f"{prefix}-files")


def build_demo(pipe, model_name: str | None = None, examples_dir: str | os.PathLike | None = None) -> gr.Blocks:
    """The demo around a loaded ``MedM2GPipeline`` (queued, not launched).

    Args:
        pipe (`MedM2GPipeline`): the model; shared by all requests, used by one at a time.
        model_name (`str`, *optional*): shown in the page and the provenance; default the pipeline's path.
        examples_dir (`str` or `os.PathLike`, *optional*): where the example files are written; default a
            temporary folder removed at exit.
    """
    model_name = model_name or Path(str(pipe.name_or_path or "MedM2GPipeline")).name
    pipe.set_progress_bar_config(disable=True)
    size = pipe.image_size
    lock = threading.Lock()  # one generation at a time on the shared model (also guards its tokenizer)
    stops = StopRequests()
    if examples_dir is None:
        examples_dir = tempfile.mkdtemp(prefix="medm2g-demo-examples-")
        atexit.register(shutil.rmtree, examples_dir, ignore_errors=True)
    examples = write_examples(Path(examples_dir), size)
    app_provenance = {"app": "medm2g demo"}

    def preview(path, key):
        if path is None:
            return None
        array, note = read_upload(path, key, size)
        if note:
            gr.Info(note)
        return condition_preview(array, key)

    def run_model(flag, progress, steps, guidance, seed, **call) -> Iterator[Any]:
        generator = torch.Generator().manual_seed(int(seed))  # this request's own randomness
        return run_pipeline(pipe, lock, flag, progress, int(steps), guidance_scale=float(guidance), generator=generator, **call)

    def generate_images(flag, conditions, prompt, targets, steps, guidance, seed, progress, notes, single=True) -> Iterator[Any]:
        started = time.perf_counter()
        output = yield from run_model(flag, progress, steps, guidance, seed, prompt=prompt, conditions=conditions,
                                      targets=list(targets), output_type="np", ct_in_hu=True)
        if output is None:
            yield gr.skip(), gr.skip(), STOPPED
            return
        seconds = time.perf_counter() - started
        with request_folder() as folder:
            gallery, files = save_images(output, folder, app_provenance)
            status = summary(" + ".join(label(t) for t in targets), seconds, int(steps), float(guidance), int(seed), model_name, notes)
            yield (gallery[0][0] if single else gallery), files, status

    def report_to_images(prompt, targets, steps, guidance, seed, request: gr.Request = None, progress=gr.Progress()):
        with stops.request(request, "report_to_images") as flag:
            prompt = (prompt or "").strip()
            if not prompt:
                raise gr.Error("Write a report, or pick an example, first.")
            if not targets:
                raise gr.Error("Choose at least one image to generate.")
            yield from generate_images(flag, None, prompt, targets, steps, guidance, seed, progress, [], single=False)

    def image_to_report(path, key, steps, guidance, seed, request: gr.Request = None, progress=gr.Progress()):
        with stops.request(request, "image_to_report") as flag:
            array, note = read_upload(path, key, size)
            started = time.perf_counter()
            output = yield from run_model(flag, progress, steps, guidance, seed, conditions={key: array}, targets=["text"])
            if output is None:
                yield gr.skip(), gr.skip(), STOPPED
                return
            seconds = time.perf_counter() - started
            report = output.text[0]
            with request_folder() as folder:
                files = save_report(report, {**output.provenance["text"], **app_provenance}, folder)
                status = summary(f"a report from {label(key)}", seconds, int(steps), float(guidance), int(seed), model_name, [note])
                yield report, files, status

    def mri_to_ct(path, key, steps, guidance, seed, request: gr.Request = None, progress=gr.Progress()):
        with stops.request(request, "mri_to_ct") as flag:
            array, note = read_upload(path, key, size)
            yield from generate_images(flag, {key: array}, None, ["ct"], steps, guidance, seed, progress, [note])

    def ct_to_xray(path, steps, guidance, seed, request: gr.Request = None, progress=gr.Progress()):
        with stops.request(request, "ct_to_xray") as flag:
            array, note = read_upload(path, "ct", size)
            yield from generate_images(flag, {"ct": array}, None, ["xray"], steps, guidance, seed, progress, [note])

    def mri_synthesis(target, t1, t2, pd, flair, steps, guidance, seed, request: gr.Request = None, progress=gr.Progress()):
        with stops.request(request, "mri_synthesis") as flag:
            uploads = dict(zip(MRI_KEYS, (t1, t2, pd, flair)))
            notes = []
            if uploads[target] is not None:
                notes.append(f"The {label(target)} upload was not used: it is the target.")
            conditions = {}
            for key, path in uploads.items():
                if key != target and path is not None:
                    conditions[key], note = read_upload(path, key, size)
                    notes.append(note)
            if not conditions:
                raise gr.Error(f"Upload at least one MRI contrast other than the target ({label(target)}).")
            notes.insert(0, "Sources: " + ", ".join(label(k) for k in conditions) + ".")
            yield from generate_images(flag, conditions, None, [target], steps, guidance, seed, progress, notes)

    def wire(tab: str, run_button: gr.Button, stop_button: gr.Button, fn, inputs: list, outputs: list) -> None:
        """Generate and Stop of one tab. Generate first records the submission (unqueued, so it is done
        before the job joins the queue); Stop then finds the job whether it is queued or running."""

        def submitted(request: gr.Request) -> None:
            stops.submitted((request.session_hash, tab))

        def stop_pressed(request: gr.Request) -> None:
            stops.stop((request.session_hash, tab))

        run_button.click(submitted, None, None, queue=False, show_progress="hidden", api_visibility="private")
        run_button.click(fn, inputs, outputs, api_name=tab, concurrency_limit=1, concurrency_id="model")
        stop_button.click(stop_pressed, None, None, queue=False, show_progress="hidden", api_visibility="private")

    with gr.Blocks(title="MedM2G demo", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.HTML(
            f'<div id="medm2g-banner" style="padding:0.6em 1em;border-radius:6px;background:#b91c1c;color:#fff;'
            f'font-weight:600;font-size:1.1em;text-align:center">{BANNER}</div>'
        )
        gr.Markdown(
            f"**MedM2G** any-to-any medical generation with `{model_name}` ({size}×{size} px, trained on virtual "
            "patients). Reports, chest X-ray, CT and brain MRI (T1, T2, PD, FLAIR) in any direction. Outputs are "
            "shown enlarged; downloads keep the model's size and say in their metadata that they are synthetic."
        )
        with gr.Tabs():
            prefix = "report_to_images"
            with gr.Tab(TABS[prefix], id=prefix, elem_id=f"{prefix}-tab"):
                with gr.Row():
                    with gr.Column():
                        prompt = gr.Textbox(label="Radiology report", lines=5, elem_id=f"{prefix}-prompt")
                        targets = gr.CheckboxGroup(
                            [(label(k), k) for k in IMAGE_KEYS], value=["xray", "ct"],
                            label="Images to generate (several are generated jointly)", elem_id=f"{prefix}-targets",
                        )
                        settings = _settings(prefix)
                        run, stop = _buttons(prefix)
                    with gr.Column():
                        gallery = gr.Gallery(label="Generated images", columns=3, height="auto", format="png", object_fit="contain", elem_id=f"{prefix}-output")
                        status = gr.Markdown(elem_id=f"{prefix}-status")
                        files = _downloads(prefix)
                gr.Examples(
                    [[examples["chest_report"], ["xray", "ct"]], [examples["head_report"], ["ct", "mri_t1", "mri_flair"]]],
                    [prompt, targets], label="Examples (virtual patients)", elem_id=f"{prefix}-examples",
                )
                wire(prefix, run, stop, report_to_images, [prompt, targets, *settings], [gallery, files, status])

            prefix = "image_to_report"
            with gr.Tab(TABS[prefix], id=prefix, elem_id=f"{prefix}-tab"):
                with gr.Row():
                    with gr.Column():
                        key = gr.Dropdown([(label(k), k) for k in IMAGE_KEYS], value="xray", label="The image is", elem_id=f"{prefix}-modality")
                        upload, shown = _upload("Image", f"{prefix}-upload")
                        settings = _settings(prefix)
                        run, stop = _buttons(prefix)
                    with gr.Column():
                        report = gr.Textbox(label="Generated report (synthetic)", lines=6, interactive=False, elem_id=f"{prefix}-output")
                        status = gr.Markdown(elem_id=f"{prefix}-status")
                        files = gr.File(label="Download (text and JSON, marked synthetic)", file_count="multiple", interactive=False, elem_id=f"{prefix}-files")
                gr.Examples(
                    [[examples["chest_xray.dcm"], "xray"], [examples["chest_xray.png"], "xray"],
                     [examples["head_ct.dcm"], "ct"], [examples["head_mri_t1.nii.gz"], "mri_t1"]],
                    [upload, key], label="Examples (virtual patients)", elem_id=f"{prefix}-examples",
                )
                gr.on([upload.change, key.change], preview, [upload, key], shown, api_visibility="private")
                wire(prefix, run, stop, image_to_report, [upload, key, *settings], [report, files, status])

            prefix = "mri_to_ct"
            with gr.Tab(TABS[prefix], id=prefix, elem_id=f"{prefix}-tab"):
                with gr.Row():
                    with gr.Column():
                        key = gr.Dropdown([(label(k), k) for k in MRI_KEYS], value="mri_t1", label="MRI contrast", elem_id=f"{prefix}-modality")
                        upload, shown = _upload("Brain MRI", f"{prefix}-upload")
                        settings = _settings(prefix)
                        run, stop = _buttons(prefix)
                    with gr.Column():
                        image = gr.Image(label="Generated CT (synthetic; window -1000…1000 HU)", type="pil", format="png", interactive=False, elem_id=f"{prefix}-output")
                        status = gr.Markdown(elem_id=f"{prefix}-status")
                        files = _downloads(prefix)
                gr.Examples(
                    [[examples["head_mri_t1.nii.gz"], "mri_t1"], [examples["head_mri_t2.dcm"], "mri_t2"]],
                    [upload, key], label="Examples (virtual patients)", elem_id=f"{prefix}-examples",
                )
                gr.on([upload.change, key.change], preview, [upload, key], shown, api_visibility="private")
                wire(prefix, run, stop, mri_to_ct, [upload, key, *settings], [image, files, status])

            prefix = "ct_to_xray"
            with gr.Tab(TABS[prefix], id=prefix, elem_id=f"{prefix}-tab"):
                with gr.Row():
                    with gr.Column():
                        upload, shown = _upload("Chest CT", f"{prefix}-upload")
                        gr.Markdown("DICOM and NIfTI CT are read in Hounsfield units, a PNG as the window −1000…1000 HU.")
                        settings = _settings(prefix)
                        run, stop = _buttons(prefix)
                    with gr.Column():
                        image = gr.Image(label="Generated chest X-ray (synthetic)", type="pil", format="png", interactive=False, elem_id=f"{prefix}-output")
                        status = gr.Markdown(elem_id=f"{prefix}-status")
                        files = _downloads(prefix)
                gr.Examples([[examples["chest_ct.dcm"]], [examples["chest_ct.nii.gz"]]], [upload], label="Examples (virtual patients)", elem_id=f"{prefix}-examples")
                upload.change(lambda path: preview(path, "ct"), upload, shown, api_visibility="private")
                wire(prefix, run, stop, ct_to_xray, [upload, *settings], [image, files, status])

            prefix = "mri_synthesis"
            with gr.Tab(TABS[prefix], id=prefix, elem_id=f"{prefix}-tab"):
                target = gr.Dropdown([(label(k), k) for k in MRI_KEYS], value="mri_flair", label="Contrast to synthesise", elem_id=f"{prefix}-target")
                gr.Markdown(f"Sources: upload one or more of the other contrasts (DICOM, NIfTI or PNG, ≤ {MAX_UPLOAD_BYTES // 2**20} MB each); they are used together.")
                sources = []
                with gr.Row():
                    for k in MRI_KEYS:
                        with gr.Column(min_width=160):
                            upload, shown = _upload(label(k).replace("MRI ", ""), f"{prefix}-{k}", hint=False)
                            upload.change(lambda path, k=k: preview(path, k), upload, shown, api_visibility="private")
                            sources.append(upload)
                with gr.Row():
                    with gr.Column():
                        settings = _settings(prefix)
                        run, stop = _buttons(prefix)
                    with gr.Column():
                        image = gr.Image(label="Synthesised MRI (synthetic)", type="pil", format="png", interactive=False, elem_id=f"{prefix}-output")
                        status = gr.Markdown(elem_id=f"{prefix}-status")
                        files = _downloads(prefix)
                e = examples
                gr.Examples(
                    [["mri_flair", e["head_mri_t1.nii.gz"], e["head_mri_t2.dcm"], e["head_mri_pd.nii.gz"], None],
                     ["mri_t1", None, e["head_mri_t2.nii.gz"], e["head_mri_pd.dcm"], None]],
                    [target, *sources], label="Examples (virtual patients; several sources are used together)", elem_id=f"{prefix}-examples",
                )
                wire(prefix, run, stop, mri_synthesis, [target, *sources, *settings], [image, files, status])

    # Light events (upload previews) may run side by side; generation shares the one "model" slot above.
    demo.queue(default_concurrency_limit=2, max_size=64)
    return demo


def load_pipeline(model: str, revision: str | None = None):
    """A bundled checkpoint, a local folder, or a Hub repository pinned to a commit hash (required)."""
    from medm2g_diffusers.cli import load_pipeline as load

    return load(model, revision)


def launch(demo: gr.Blocks, server_name: str | None = None, server_port: int | None = None, **kwargs):
    """Starts the server; host and port default to GRADIO_SERVER_NAME / GRADIO_SERVER_PORT, else Gradio's."""
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    return demo.launch(server_name=server_name, server_port=server_port, max_file_size=MAX_UPLOAD_BYTES,
                       ssr_mode=False, theme=theme, **kwargs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medm2g demo", description="The MedM2G Gradio demo (offline).")
    parser.add_argument("--model", default=os.environ.get("MEDM2G_MODEL", DEFAULT_CHECKPOINT),
                        help="a bundled checkpoint name or a pipeline folder (default: $MEDM2G_MODEL or %(default)s)")
    parser.add_argument("--revision", default=os.environ.get("MEDM2G_MODEL_REVISION"),
                        help="commit hash of a Hub --model (required for Hub models; default: $MEDM2G_MODEL_REVISION)")
    parser.add_argument("--server-name", default=None, help="host to listen on (default: $GRADIO_SERVER_NAME or 127.0.0.1)")
    parser.add_argument("--server-port", type=int, default=None, help="port (default: $GRADIO_SERVER_PORT or 7860)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    pipe = load_pipeline(args.model, args.revision)
    demo = build_demo(pipe, model_name=Path(args.model).name)
    launch(demo, args.server_name, args.server_port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
