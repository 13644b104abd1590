"""The demo served over HTTP and called through ``gradio_client``: concurrent users each get their own result,
and the upload limit is enforced by the server."""

from __future__ import annotations

from pathlib import Path

import pytest
from free_port import free_port
from space_app import load_app

gr = pytest.importorskip("gradio", reason="the demo extra is not installed (pip install -e '.[demo]')")
from gradio_client import Client

from medm2g_diffusers import MedM2GPipeline
from medm2g_diffusers.data.io import read_provenance

ROOT = Path(__file__).resolve().parents[1]
# Gradio's queue analytics call pandas in ways pandas 3 deprecates; not ours to fix.
pytestmark = [
    pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tiny_pipeline import get_dummy_components

    app = load_app()
    demo = app.build_demo(MedM2GPipeline(**get_dummy_components()), model_name="tiny-test",
                          examples_dir=tmp_path_factory.mktemp("examples"))
    _, url, _ = app.launch(demo, "127.0.0.1", free_port(), prevent_thread_lock=True, quiet=True)
    yield url
    demo.close()


def test_two_concurrent_clients_get_their_own_targets(server, tmp_path):
    first = Client(server, verbose=False, download_files=str(tmp_path / "first"))
    second = Client(server, verbose=False, download_files=str(tmp_path / "second"))
    # Submitted together: the second waits in the queue while the first runs, then runs itself.
    jobs = [
        first.submit("FINDINGS: Large left pleural effusion. IMPRESSION: Effusion.", ["xray"], 3, 2.0, 11, api_name="/report_to_images"),
        second.submit("FINDINGS: Right frontal haemorrhage. IMPRESSION: Bleed.", ["ct", "mri_t2"], 3, 2.0, 22, api_name="/report_to_images"),
    ]
    (gallery_a, files_a, status_a), (gallery_b, files_b, status_b) = (job.result(timeout=240) for job in jobs)

    assert [item["caption"] for item in gallery_a] == ["chest X-ray (synthetic)"]
    assert [item["caption"] for item in gallery_b] == ["CT (synthetic)", "MRI T2-weighted (synthetic)"]
    assert sorted(Path(f).name for f in files_a) == ["xray_seed11.dcm", "xray_seed11.png"]
    assert sorted(Path(f).name for f in files_b) == ["ct_seed22.dcm", "ct_seed22.png", "mri_t2_seed22.dcm", "mri_t2_seed22.png"]
    for files, prompt, seed in ((files_a, "Large left pleural effusion", 11), (files_b, "Right frontal haemorrhage", 22)):
        for path in files:
            provenance = read_provenance(path)
            assert prompt in provenance["prompt"] and provenance["seed"] == seed
    assert "seed 11" in status_a and "seed 22" in status_b


def test_server_refuses_uploads_over_the_limit(server, tmp_path):
    import httpx

    app = load_app()
    huge = tmp_path / "huge.dcm"
    with huge.open("wb") as f:
        f.truncate(app.MAX_UPLOAD_BYTES + 1024)
    with huge.open("rb") as f:
        response = httpx.post(f"{server}gradio_api/upload", files={"files": ("huge.dcm", f)}, timeout=60)
    assert response.status_code == 413, response.text
