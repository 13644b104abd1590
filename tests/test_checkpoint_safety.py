"""Checkpoints are data, never code: safetensors only unless the caller opts in to pickle by name, no
``trust_remote_code``, and Hub models pinned to a commit in the CLI and the Space."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from tiny_pipeline import get_dummy_components

from medm2g_diffusers import MedM2GPipeline
from medm2g_diffusers.checkpoints import BUNDLED_CHECKPOINTS, UnsafeCheckpointError, pickle_weight_files
from medm2g_diffusers.cli import load_pipeline, main

PROMPT = "FINDINGS: Small right pleural effusion. IMPRESSION: Effusion."
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("safety") / "pipeline"
    MedM2GPipeline(**get_dummy_components()).save_pretrained(path)
    return path


def sample(pipe) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt=PROMPT, targets=["xray"], num_inference_steps=2, generator=torch.manual_seed(0), output_type="pt").images["xray"]


class Exploit:
    """Unpickling this writes a marker file: what a hostile pickle checkpoint can do."""

    marker: Path

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_safetensors_pipeline_loads_without_any_unpickling(saved, monkeypatch):
    assert not pickle_weight_files(saved)

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called while loading a safetensors checkpoint")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    assert sample(MedM2GPipeline.from_pretrained(saved)).shape == (1, 1, 32, 32)


def test_pickle_weights_are_refused_unless_allowed_by_name(saved, tmp_path):
    converted = tmp_path / "pickled"
    pipe = MedM2GPipeline.from_pretrained(saved)
    pipe.save_pretrained(converted, safe_serialization=False)
    assert pickle_weight_files(converted)
    with pytest.raises(UnsafeCheckpointError, match="allow_pickle=True"):
        MedM2GPipeline.from_pretrained(converted)
    with pytest.raises(UnsafeCheckpointError, match="allow_pickle=True"):
        MedM2GPipeline.from_pretrained(saved, use_safetensors=False)
    allowed = MedM2GPipeline.from_pretrained(converted, allow_pickle=True)
    assert torch.equal(sample(allowed), sample(pipe))


def test_a_hostile_pickle_is_never_opened(saved, tmp_path):
    hostile = tmp_path / "hostile"
    MedM2GPipeline.from_pretrained(saved).save_pretrained(hostile)
    Exploit.marker = tmp_path / "marker.txt"
    weights = next((hostile / "vae").glob("*.safetensors"))
    weights.unlink()
    (hostile / "vae" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(UnsafeCheckpointError, match=r"vae/diffusion_pytorch_model\.bin"):
        MedM2GPipeline.from_pretrained(hostile)
    assert not Exploit.marker.exists()


@pytest.mark.parametrize("kwargs", [{"trust_remote_code": True}, {"custom_pipeline": "pipeline.py"}])
def test_remote_code_is_refused(saved, kwargs):
    with pytest.raises(UnsafeCheckpointError, match=next(iter(kwargs))):
        MedM2GPipeline.from_pretrained(saved, **kwargs)


def test_bundled_checkpoint_is_safetensors_and_names_only_library_classes():
    folder = BUNDLED_CHECKPOINTS["medm2g-tiny"]
    assert not pickle_weight_files(folder)
    assert list(folder.rglob("*.safetensors"))
    index = json.loads((folder / "model_index.json").read_text())
    libraries = {value[0] for key, value in index.items() if not key.startswith("_") and isinstance(value, list)}
    assert {library.split(".")[0] for library in libraries} <= {"medm2g_diffusers", "diffusers", "transformers"}
    assert not list(folder.rglob("*.py"))


def test_cli_requires_a_commit_for_hub_models(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(MedM2GPipeline, "from_pretrained", classmethod(lambda cls, name, **kw: calls.append((name, kw)) or "pipe"))
    for revision in (None, "main", "v1.0", COMMIT[:12]):
        with pytest.raises(ValueError, match="--revision must be the 40-character commit hash"):
            load_pipeline("someone/medm2g-base", revision)
    assert calls == []
    assert load_pipeline("someone/medm2g-base", COMMIT) == "pipe"
    assert calls == [("someone/medm2g-base", {"revision": COMMIT})]
    with pytest.raises(ValueError, match="Hub repositories only"):
        load_pipeline("medm2g-tiny", COMMIT)
    assert main(["generate", "--model", "someone/medm2g-base", "--prompt", PROMPT, "--targets", "xray"]) == 2
    assert "--revision must be" in capsys.readouterr().err


def test_space_pins_hub_revisions(monkeypatch):
    pytest.importorskip("gradio", reason="the demo extra is not installed (pip install -e '.[demo]')")
    from space_app import load_app

    app = load_app()
    calls = []
    monkeypatch.setattr(MedM2GPipeline, "from_pretrained", classmethod(lambda cls, name, **kw: calls.append((name, kw)) or "pipe"))
    with pytest.raises(ValueError, match="--revision"):
        app.load_pipeline("someone/medm2g-base")
    assert app.load_pipeline("someone/medm2g-base", COMMIT) == "pipe"
    assert calls == [("someone/medm2g-base", {"revision": COMMIT})]
