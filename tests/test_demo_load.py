"""The demo under concurrent load and abusive uploads, served over HTTP in its own process
(scripts/reliability/demo_load.py): requests are served, memory comes back, uploads over the limit and wrong
file types get clear messages, and nothing is written outside the server's temp folder."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from space_app import load_app

gr = pytest.importorskip("gradio", reason="the demo extra is not installed (pip install -e '.[demo]')")
pytest.importorskip("gradio_client")

ROOT = Path(__file__).resolve().parents[1]
STEPS = 2
pytestmark = [
    pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]


def _load_script():
    spec = importlib.util.spec_from_file_location("demo_load", ROOT / "scripts" / "reliability" / "demo_load.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


dl = _load_script()


@pytest.fixture(scope="module")
def server():
    """The demo with the tiny pipeline in its own process: GRADIO_TEMP_DIR = TMPDIR = one temp folder, an
    empty private cwd, and an audit hook recording writes outside that folder."""
    server = dl.DemoServer("tiny").start()
    yield server
    server.stop()
    server.cleanup()


def assert_nothing_written_outside_temp(server) -> None:
    status = server.settle(0)
    assert status["writes_outside_temp"] == {}, status["writes_outside_temp"]
    assert not any(server.cwd.iterdir()), list(server.cwd.iterdir())


# ------------------------------------------------------------------------------------------------ load


def test_bounded_load_from_concurrent_clients_is_served_and_memory_comes_back(server):
    """12 requests over the five tabs from 4 concurrent gradio_client clients (the full 50 x 8 run is
    scripts/reliability/demo_load.py)."""
    examples = server.info["examples"]
    before = dl.snapshot([ROOT, server.cwd], exclude=[server.run_dir])
    warm = dl.fire(server.url, examples, server.client_dir, len(dl.TABS), 1, STEPS, 120, 300, first_index=1000)
    assert warm.served == len(dl.TABS), warm.failures
    baseline = server.settle(1)
    sampler = dl.PeakSampler(server.pid)
    sampler.start()
    load = dl.fire(server.url, examples, server.client_dir, 12, 4, STEPS, request_timeout=120, deadline_s=240)
    peak = sampler.stop()
    settled = server.settle(1)

    assert (load.served, load.rejected, load.failed) == (12, 0, 0), load.failures
    assert all(counts["served"] >= 2 for counts in load.per_tab.values())
    assert load.download_problems == []  # every download has the app's name and came from the server's temp
    assert server.alive()
    assert peak >= baseline["rss"] * 0.9
    assert settled["rss"] <= 1.25 * baseline["rss"], (baseline["rss"], peak, settled["rss"])
    after = dl.snapshot([ROOT, server.cwd], exclude=[server.run_dir])
    written = [p for p in dl.changed(before, after) if p in settled["writes_outside_temp"]]
    assert written == []
    assert_nothing_written_outside_temp(server)


# --------------------------------------------------------------------------------------------- uploads


def test_upload_over_the_limit_is_refused_with_a_clear_message_and_leaves_nothing(server, tmp_path):
    app = load_app()
    status, body = dl.upload(server.url, "huge.dcm", b"\0" * (app.MAX_UPLOAD_BYTES + 1024))
    assert status == 413 and "maximum allowed size of 52428800 bytes" in str(body)
    assert sum(f.stat().st_size for f in server.temp.rglob("*") if f.is_file()) < app.MAX_UPLOAD_BYTES

    # What an API client sees: gradio_client checks the server's limit before it sends the file (and so
    # does the browser).
    from gradio_client import Client, handle_file

    huge = tmp_path / "huge.dcm"
    with huge.open("wb") as f:
        f.truncate(app.MAX_UPLOAD_BYTES + 1)
    client = Client(server.url, verbose=False, download_files=str(tmp_path / "out"), analytics_enabled=False)
    with pytest.raises(ValueError, match="exceeds the maximum file size of 52428800 bytes"):
        client.predict(handle_file(str(huge)), STEPS, 2.0, 0, api_name="/ct_to_xray")


@pytest.mark.parametrize("name", dl.TRAVERSAL_NAMES, ids=lambda n: repr(n)[:40])
def test_upload_names_with_path_traversal_stay_in_the_temp_folder(server, name):
    example = Path(server.info["examples"]["chest_ct.dcm"]).read_bytes()
    status, body = dl.upload(server.url, name, example)
    if status != 200:
        assert 400 <= status < 500, body  # refused, not a server error
    else:
        stored = Path(body[0])
        assert stored.resolve().is_relative_to(server.temp.resolve()) and stored.is_file()
        assert stored.parent.parent.resolve() == server.temp.resolve()  # <temp>/<sha>/<plain name>
        assert "\0" not in stored.name and len(stored.name.encode()) <= 255
    assert_nothing_written_outside_temp(server)


@pytest.mark.parametrize("name", ["../../evil.dcm", b"evil\x00/../../x.dcm", "/tmp/medm2g-evil-abs.dcm"], ids=repr)
def test_downloads_have_the_app_s_names_inside_the_temp_folder_whatever_the_upload_was_called(server, name):
    example = Path(server.info["examples"]["chest_ct.dcm"]).read_bytes()
    status, body = dl.upload(server.url, name, example)
    assert status == 200
    shown = name if isinstance(name, str) else name.decode()
    kind, outputs = dl.call(server.url, "ct_to_xray", [dl.file_data(body[0], orig_name=shown), STEPS, 2.0, 5])
    assert kind == "complete", outputs
    files = outputs[1]
    assert sorted(Path(f["path"]).name for f in files) == ["xray_seed5.dcm", "xray_seed5.png"]
    for f in files:
        assert Path(f["path"]).resolve().is_relative_to(server.temp.resolve())
    assert_nothing_written_outside_temp(server)


@pytest.mark.parametrize("name, content, expected", dl.BAD_FILES, ids=[b[0] for b in dl.BAD_FILES])
def test_wrong_file_types_are_refused_by_the_reader_with_a_message(server, name, content, expected):
    status, body = dl.upload(server.url, name, content)
    assert status == 200  # Gradio takes any file; our reader decides
    kind, message = dl.call(server.url, "ct_to_xray", [dl.file_data(body[0]), STEPS, 2.0, 0])
    assert kind == "error" and message.startswith(name) and expected in message
    assert "Traceback" not in message and str(server.temp) not in message


@pytest.mark.parametrize("path", ["/etc/passwd", str(ROOT / "pyproject.toml"), "../../../../etc/passwd"])
def test_server_paths_the_user_did_not_upload_are_not_read(server, path):
    kind, message = dl.call(server.url, "image_to_report", [dl.file_data(path), "xray", STEPS, 2.0, 0])
    assert kind == "error" and "root:" not in str(message) and "[project]" not in str(message)


def test_an_unexpected_reader_failure_is_a_message_not_a_traceback(monkeypatch, tmp_path):
    app = load_app()

    def broken(path):
        raise TypeError("A UID must be created from a string")  # what a mangled transfer syntax UID raised

    monkeypatch.setattr(app, "read_image", broken)
    (tmp_path / "scan.dcm").write_bytes(b"x")
    with pytest.raises(gr.Error) as error:
        app.read_upload(tmp_path / "scan.dcm", "ct", 32)
    assert error.value.message == "scan.dcm could not be read as a DICOM, NIfTI, PNG or JPEG image; it may be corrupt."


def test_request_folders_stay_when_gradio_serves_them_in_place(monkeypatch, tmp_path):
    """With GRADIO_TEMP_DIR set to the temp folder itself, Gradio does not copy returned files (they are
    already in its cache), so removing the request folder would break the download links."""
    import tempfile

    app = load_app()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    with app.request_folder() as folder:
        (folder / "ct_seed0.png").write_bytes(b"png")
    assert not folder.exists()  # copied by Gradio into tmp/gradio, so removed
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    with app.request_folder() as folder:
        (folder / "ct_seed0.png").write_bytes(b"png")
    assert (folder / "ct_seed0.png").is_file()  # served in place; Gradio's delete_cache removes it


def test_write_audit_sees_writes_outside_the_allowed_folder(tmp_path):
    """The positive control of the audit hook the load check relies on."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    code = textwrap.dedent(f"""
        import importlib.util, json, os, shutil, sys, tempfile
        spec = importlib.util.spec_from_file_location("demo_load", {str(ROOT / "scripts/reliability/demo_load.py")!r})
        dl = importlib.util.module_from_spec(spec); sys.modules["demo_load"] = dl; spec.loader.exec_module(dl)
        audit = dl.WriteAudit([{str(allowed)!r}]); audit.install()
        open({str(allowed / "ok.txt")!r}, "w").write("fine")
        open({str(outside / "a.txt")!r}, "w").write("bad")
        os.close(os.open({str(outside / "b.txt")!r}, os.O_WRONLY | os.O_CREAT))
        os.mkdir({str(outside / "d")!r})
        shutil.move({str(allowed / "ok.txt")!r}, {str(outside / "moved.txt")!r})
        open({str(outside / "a.txt")!r}).read()  # reading is fine
        print(json.dumps(sorted(audit.outside)))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    seen = {Path(p).name for p in __import__("json").loads(out.strip().splitlines()[-1])}
    assert seen == {"a.txt", "b.txt", "d", "moved.txt"}


# --------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_demo_load_script_end_to_end(tmp_path):
    out = tmp_path / "summary.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts/reliability/demo_load.py"), "--requests", "10", "--clients", "4",
         "--steps", str(STEPS), "--no-home-snapshot", "--out", str(out)],
        capture_output=True, text=True, timeout=600, check=False,
    )
    import json

    summary = json.loads(out.read_text())
    assert result.returncode == 0, summary["failures_all"]
    assert (summary["served"], summary["failed"]) == (10, 0) and summary["server_alive_after"]
    assert summary["files_outside_temp"] == [] and all(p["ok"] for p in summary["upload_probes"])


@pytest.mark.slow
def test_a_full_queue_is_a_clean_rejection(tmp_path):
    out = tmp_path / "summary.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts/reliability/demo_load.py"), "--requests", "16", "--clients", "8",
         "--steps", "20", "--queue-size", "1", "--no-probes", "--no-home-snapshot", "--out", str(out)],
        capture_output=True, text=True, timeout=600, check=False,
    )
    import json

    summary = json.loads(out.read_text())
    assert result.returncode == 0, summary["failures_all"]
    assert summary["rejected_queue_full"] > 0 and summary["failed"] == 0
    assert summary["served"] + summary["rejected_queue_full"] == 16
