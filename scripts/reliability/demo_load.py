"""Load and upload-safety check of the Gradio demo (space/app.py) served over HTTP.

Starts the demo in a separate process on 127.0.0.1 (the tiny test pipeline by default, or ``--model
medm2g-tiny``), warms it up, sends a few abusive uploads (path-traversal names, NUL bytes, long names,
disguised files), then fires ``--requests`` generation requests from ``--clients`` concurrent
``gradio_client`` clients across the five tabs' API endpoints, each bounded by ``--request-timeout``.

Recorded: requests served, cleanly rejected by the queue ("queue full"), failed otherwise; whether the server
is alive after; its RSS at baseline (after warm-up), peak (sampled during the load) and after the load
settles, with the ratio after/baseline; and every file written outside the server's temporary folder.

The server process gets one temporary folder as both GRADIO_TEMP_DIR and TMPDIR (the layout in which the
app's own files already lie in Gradio's cache, so Gradio serves them in place), a private empty working
directory, and a Python audit hook that records every write, rename, mkdir or delete outside that folder
(with the path). The repository tree, the home directory and the working directories are also snapshotted
before and after: a change there counts as the server's when the audit hook saw the server write it, or
when it is in the server's private working directory; other changes (other people editing the tree, other
test runs) are listed as unattributed and fail the run only with ``--strict-files``.

"Settled" memory: the server runs ``gc.collect()`` and glibc ``malloc_trim(0)`` (returning freed heap
pages to the OS, so that what remains is memory still in use), then ``--settle`` seconds pass; the
baseline is measured the same way after warm-up. ``--rounds R`` repeats the load R times and settles after
each, to tell a leak (settled RSS climbing by round) from allocator warm-up (increments shrinking).

Prints a JSON summary (also written to ``--out``) and exits 1 if any request was neither served nor
cleanly rejected, the server died, settled RSS exceeded ``--memory-tolerance`` x baseline, a download had
a name the app did not choose or lay outside the temp folder, an upload probe misbehaved, or a file was
written outside the temp folder. Exit 2: the server did not start.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/reliability/demo_load.py --out /tmp/demo_load.json
    OMP_NUM_THREADS=1 .venv/bin/python scripts/reliability/demo_load.py --model medm2g-tiny --steps 10
"""

from __future__ import annotations

# Only the standard library at module level: the server process installs its audit hook before it imports
# anything heavy, so that every write it makes afterwards is seen.
import argparse
import gc
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

ROOT = Path(__file__).resolve().parents[2]
TABS = ("report_to_images", "image_to_report", "mri_to_ct", "ct_to_xray", "mri_synthesis")
DOWNLOAD_NAME = re.compile(r"(xray|ct|mri_t1|mri_t2|mri_pd|mri_flair|report)_seed\d+\.(png|dcm|txt|json)")
"""The names the app gives its downloads; nothing of the user's (file names, prompts) goes into them."""
SNAPSHOT_EXCLUDE = (".git",)
"""Folder names never walked by the snapshot (git's own objects; the server has no reason to write there)."""


# =============================================================================================== server


class WriteAudit:
    """A ``sys.addaudithook`` hook that records file-system writes outside the allowed folders.

    Sees every write made through Python (``open`` for writing, ``os.open`` with write flags, renames,
    mkdir, symlinks, deletes), which covers Gradio, anyio, pydicom, nibabel, Pillow and tempfile; native
    code writing on its own is left to the before/after snapshot.
    """

    WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    TARGETS: ClassVar[dict[str, tuple[int, ...]]] = {  # event -> indices of its arguments that are written paths
        "os.rename": (1,), "os.replace": (1,), "os.mkdir": (0,), "os.symlink": (1,), "os.link": (1,),
        "os.truncate": (0,), "os.remove": (0,), "os.unlink": (0,), "os.rmdir": (0,), "shutil.rmtree": (0,),
        "os.chmod": (0,), "os.utime": (0,),
    }

    def __init__(self, allowed: list[str]) -> None:
        self.allowed = tuple(os.path.realpath(a) for a in allowed)
        self.outside: dict[str, str] = {}  # path -> first event
        self.inside = 0
        self._busy = threading.local()

    def install(self) -> None:
        sys.addaudithook(self)

    def __call__(self, event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = (tuple(args) + (None, None, None))[:3]
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                mode is None and isinstance(flags, int) and flags & self.WRITE_FLAGS)
            if not writing:
                return
            paths = (path,)
        elif event in self.TARGETS:
            paths = tuple(args[i] for i in self.TARGETS[event] if i < len(args))
        else:
            return
        if getattr(self._busy, "on", False):
            return
        self._busy.on = True
        try:
            for path in paths:
                if isinstance(path, int) or path is None:  # an fd: its opening was checked
                    continue
                real = os.path.realpath(os.fsdecode(path))
                if real == os.devnull or real.startswith(self.allowed):
                    self.inside += 1
                elif len(self.outside) < 1000:
                    self.outside.setdefault(real, event)
        except Exception:  # an audit hook must never break the operation it watches
            pass
        finally:
            self._busy.on = False


def _rss_self() -> int:
    with open("/proc/self/statm") as f:  # a read: not audited as a write
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _malloc_trim() -> bool:
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def serve(args: argparse.Namespace) -> int:
    """The server process: the demo on 127.0.0.1:``--port``, controlled by signals.

    SIGUSR1: ``gc.collect()`` + ``malloc_trim(0)``, then ``<control>/status-<n>.json`` with the audit so far.
    SIGTERM: close the demo and exit.
    """
    control, temp = Path(args.control), Path(args.temp)
    audit = WriteAudit([str(temp), str(control)])
    audit.install()
    tempfile.tempdir = str(temp)  # TMPDIR says the same; this holds even if TMPDIR was ignored
    sys.path.insert(0, str(ROOT / "tests"))  # tiny_pipeline, space_app
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

    from space_app import load_app

    app = load_app()
    if args.model == "tiny":
        from tiny_pipeline import get_dummy_components

        from medm2g_diffusers import MedM2GPipeline

        pipe, model_name = MedM2GPipeline(**get_dummy_components()), "tiny-test"
    else:
        pipe, model_name = app.load_pipeline(args.model), Path(args.model).name
    demo = app.build_demo(pipe, model_name=model_name, examples_dir=temp / "examples")
    if args.queue_size is not None:  # only to exercise the queue-full path
        demo.queue(default_concurrency_limit=2, max_size=args.queue_size)
    _, url, _ = app.launch(demo, "127.0.0.1", args.port, prevent_thread_lock=True, quiet=True)
    examples = app.write_examples(temp / "inputs", pipe.image_size)

    counter = {"n": 0}

    def write_json(name: str, payload: dict) -> None:
        part = control / f".{name}"
        part.write_text(json.dumps(payload))
        part.replace(control / name)

    def status(*_):
        gc.collect()
        before_trim = _rss_self()
        trimmed = _malloc_trim()
        counter["n"] += 1
        write_json(f"status-{counter['n']}.json", {
            "rss_after_gc": before_trim, "rss_after_trim": _rss_self(), "malloc_trim": trimmed,
            "writes_outside_temp": audit.outside, "writes_inside_temp": audit.inside,
        })

    stop = threading.Event()
    signal.signal(signal.SIGUSR1, status)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    write_json("ready.json", {"url": url, "pid": os.getpid(), "image_size": pipe.image_size, "examples": examples,
                              "upload_dir": str(demo.app.uploaded_file_dir) if getattr(demo, "app", None) else None})
    while not stop.wait(0.2):
        pass
    demo.close()
    return 0


# =========================================================================================== controller


def rss(pid: int) -> int | None:
    """Resident set size of ``pid`` in bytes (psutil if installed, else /proc)."""
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss
    except ImportError:
        pass
    except Exception:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def vm_hwm(pid: int) -> int | None:
    """Peak RSS since the process started (Linux VmHWM), startup included."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class DemoServer:
    """The demo in its own process with its own temp folder, private cwd and write audit."""

    def __init__(self, model: str = "tiny", run_dir: str | os.PathLike | None = None, queue_size: int | None = None,
                 start_timeout: float = 300.0) -> None:
        self.run_dir = Path(run_dir or tempfile.mkdtemp(prefix="medm2g-demo-load-")).resolve()
        self.temp, self.cwd = self.run_dir / "server-tmp", self.run_dir / "server-cwd"
        self.control, self.client_dir = self.run_dir / "control", self.run_dir / "client"
        for folder in (self.temp, self.cwd, self.control, self.client_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.model, self.queue_size, self.start_timeout = model, queue_size, start_timeout
        self.log_path = self.run_dir / "server.log"
        self.proc: subprocess.Popen | None = None
        self.info: dict[str, Any] = {}
        self._statuses = 0

    def start(self) -> DemoServer:
        port = _free_port()
        env = {**os.environ, "GRADIO_TEMP_DIR": str(self.temp), "TMPDIR": str(self.temp), "TEMP": str(self.temp),
               "TMP": str(self.temp), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
               "PYTHONDONTWRITEBYTECODE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1",
               "PYTHONUNBUFFERED": "1"}
        # torch exports the cache folder it picked into os.environ (torch/_inductor/runtime/cache_dir_utils.py);
        # one inherited from a parent that imported torch would point outside this server's temp folder.
        env.pop("TORCHINDUCTOR_CACHE_DIR", None)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
        command = [sys.executable, str(Path(__file__).resolve()), "--serve", "--port", str(port), "--model", self.model,
                   "--temp", str(self.temp), "--control", str(self.control)]
        if self.queue_size is not None:
            command += ["--queue-size", str(self.queue_size)]
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(command, cwd=self.cwd, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.start_timeout
        ready = self.control / "ready.json"
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the demo server did not start (exit {self.proc.returncode}):\n{self.log_tail()}")
            time.sleep(0.2)
        self.info = json.loads(ready.read_text())
        return self

    @property
    def url(self) -> str:
        return self.info["url"]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def settle(self, seconds: float) -> dict[str, Any]:
        """gc + malloc_trim in the server, ``seconds`` of quiet, then its RSS and write audit."""
        self._statuses += 1
        path = self.control / f"status-{self._statuses}.json"
        os.kill(self.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 60
        while not path.exists():
            if not self.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not answer its status signal:\n{self.log_tail()}")
            time.sleep(0.05)
        status = json.loads(path.read_text())
        time.sleep(seconds)
        status["rss"] = rss(self.pid)
        return status

    def log_tail(self, chars: int = 4000) -> str:
        with suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode

    def cleanup(self) -> None:
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def __enter__(self) -> DemoServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------- requests


PROMPTS = (  # short enough for every pipeline's max_text_tokens (the tiny test pipeline's is 160)
    "FINDINGS: Right frontal haemorrhage with mild mass effect. IMPRESSION: Haemorrhage.",
    "FINDINGS: Small left pleural effusion. No pneumothorax. IMPRESSION: Effusion.",
)


def request_args(tab: str, index: int, examples: dict[str, Any], steps: int) -> list[Any]:
    """Valid inputs of one request to ``tab``: the server's example files (uploaded by the client)."""
    from gradio_client import handle_file

    seed, guidance = index, 2.0
    if tab == "report_to_images":
        return [PROMPTS[index % 2], ["xray", "ct"] if index % 2 else ["ct", "mri_t1"], steps, guidance, seed]
    if tab == "image_to_report":
        return [handle_file(examples["chest_xray.dcm" if index % 2 else "chest_xray.png"]), "xray", steps, guidance, seed]
    if tab == "mri_to_ct":
        return [handle_file(examples["head_mri_t1.nii.gz"]), "mri_t1", steps, guidance, seed]
    if tab == "ct_to_xray":
        return [handle_file(examples["chest_ct.dcm" if index % 2 else "chest_ct.nii.gz"]), steps, guidance, seed]
    if tab == "mri_synthesis":
        return ["mri_flair", handle_file(examples["head_mri_t1.nii.gz"]), handle_file(examples["head_mri_t2.dcm"]),
                handle_file(examples["head_mri_pd.nii.gz"]), None, steps, guidance, seed]
    raise ValueError(tab)


def download_problems(tab: str, result: Any, client_dir: Path) -> list[str]:
    """Downloads whose name the app did not choose, or that the client did not store where it was told."""
    files = result[1] if isinstance(result, (list, tuple)) and len(result) > 1 else None
    problems = []
    for path in files or []:
        path = Path(path if isinstance(path, str) else path.get("path", ""))
        if not DOWNLOAD_NAME.fullmatch(path.name):
            problems.append(f"{tab}: download named {path.name!r}")
        if not path.resolve().is_relative_to(client_dir.resolve()):
            problems.append(f"{tab}: download stored at {path}")
    if not files:
        problems.append(f"{tab}: no downloads in the result")
    return problems


@dataclass
class LoadResult:
    served: int = 0
    rejected: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)
    rejections: list[str] = field(default_factory=list)
    download_problems: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    per_tab: dict[str, dict[str, int]] = field(default_factory=dict)
    wall_s: float = 0.0

    def merge(self, other: LoadResult) -> None:
        for name in ("served", "rejected", "failed", "wall_s"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in ("failures", "rejections", "download_problems", "latencies"):
            getattr(self, name).extend(getattr(other, name))
        for tab, counts in other.per_tab.items():
            for kind, n in counts.items():
                self.per_tab.setdefault(tab, {}).setdefault(kind, 0)
                self.per_tab[tab][kind] += n


def fire(url: str, examples: dict[str, Any], client_dir: Path, requests: int, clients: int, steps: int,
         request_timeout: float, deadline_s: float, tabs: tuple[str, ...] = TABS, first_index: int = 0) -> LoadResult:
    """``requests`` requests, round-robin over ``tabs``, from ``clients`` concurrent ``gradio_client`` clients.

    A request is served (the job finished with outputs), cleanly rejected (the queue said it is full) or
    failed (an app error, an exception, or no answer within ``request_timeout`` / the overall deadline).
    """
    from concurrent.futures import TimeoutError as FutureTimeout

    from gradio_client import Client
    from gradio_client.exceptions import AppError

    try:
        from gradio_client.utils import QueueError
    except ImportError:  # pragma: no cover - older clients
        QueueError = type("QueueError", (Exception,), {})

    result = LoadResult(per_tab={t: {"served": 0, "rejected": 0, "failed": 0} for t in tabs})
    lock = threading.Lock()
    todo = iter(range(first_index, first_index + requests))
    started = time.monotonic()
    end = started + deadline_s

    def record(tab: str, kind: str, note: str | None = None, latency: float | None = None) -> None:
        with lock:
            setattr(result, kind, getattr(result, kind) + 1)
            result.per_tab[tab][kind] += 1
            if note and kind == "failed":
                result.failures.append(note)
            elif note and kind == "rejected":
                result.rejections.append(note)
            if latency is not None:
                result.latencies.append(latency)

    def worker(number: int) -> None:
        folder = client_dir / f"client-{number}"
        client = None
        while True:
            with lock:
                index = next(todo, None)
            if index is None:
                return
            tab = tabs[index % len(tabs)]
            remaining = end - time.monotonic()
            if remaining <= 0:
                record(tab, "failed", f"{tab}#{index}: not sent, the overall deadline had passed")
                continue
            t0 = time.monotonic()
            try:
                if client is None:
                    client = Client(url, verbose=False, download_files=str(folder), analytics_enabled=False,
                                    httpx_kwargs={"timeout": min(request_timeout, remaining)})
                job = client.submit(*request_args(tab, index, examples, steps), api_name=f"/{tab}")
                try:
                    output = job.result(timeout=min(request_timeout, remaining))
                except (FutureTimeout, TimeoutError):
                    job.cancel()
                    record(tab, "failed", f"{tab}#{index}: no answer within {min(request_timeout, remaining):.0f} s")
                    continue
            except QueueError as error:
                record(tab, "rejected", f"{tab}#{index}: {error}")
                continue
            except AppError as error:
                message = str(error)
                kind = "rejected" if "queue is full" in message.lower() else "failed"
                record(tab, kind, f"{tab}#{index}: {type(error).__name__}: {message[:300]}")
                continue
            except Exception as error:
                message = str(error)
                kind = "rejected" if "queue is full" in message.lower() else "failed"
                record(tab, kind, f"{tab}#{index}: {type(error).__name__}: {message[:300]}")
                continue
            problems = download_problems(tab, output, client_dir)
            with lock:
                result.download_problems += problems
            record(tab, "served", latency=time.monotonic() - t0)

    threads = [threading.Thread(target=worker, args=(n,), name=f"load-client-{n}", daemon=True) for n in range(clients)]
    for thread in threads:
        thread.start()
    hard_end = end + request_timeout + 30  # a request sent just before the deadline may take request_timeout
    for thread in threads:
        thread.join(max(0.0, hard_end - time.monotonic()))
    hung = sum(t.is_alive() for t in threads)
    if hung:
        result.failures.append(f"{hung} client thread(s) still running after the deadline")
        result.failed += requests - (result.served + result.rejected + result.failed)
    result.wall_s = time.monotonic() - started
    return result


class PeakSampler(threading.Thread):
    """Samples the server's RSS every ``interval`` s until stopped; keeps the maximum."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.pid, self.interval, self.peak, self.samples = pid, interval, 0, 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            value = rss(self.pid)
            if value:
                self.peak, self.samples = max(self.peak, value), self.samples + 1
            self._stop_event.wait(self.interval)

    def stop(self) -> int:
        self._stop_event.set()
        self.join(5)
        return self.peak


# ------------------------------------------------------------------------------------- upload probes


def upload(url: str, name: str | bytes, content: bytes) -> tuple[int, Any]:
    """POSTs one file to Gradio's upload route with exactly this file name (bytes: sent raw, e.g. a NUL)."""
    import httpx

    boundary = "medm2gprobeboundary"
    raw_name = name if isinstance(name, bytes) else name.encode()
    body = (b"--" + boundary.encode() + b"\r\nContent-Disposition: form-data; name=\"files\"; filename=\"" + raw_name
            + b"\"\r\nContent-Type: application/octet-stream\r\n\r\n" + content + b"\r\n--" + boundary.encode() + b"--\r\n")
    response = httpx.post(f"{url}gradio_api/upload", content=body, timeout=120,
                          headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        return response.status_code, response.json()
    except ValueError:
        return response.status_code, response.text


def call(url: str, api: str, data: list[Any], timeout: float = 120) -> tuple[str, Any]:
    """One request through Gradio's REST API: ``("complete", outputs)`` or ``("error", message)``."""
    import httpx

    response = httpx.post(f"{url}gradio_api/call/{api}", json={"data": data}, timeout=timeout)
    if response.status_code != 200:
        return "http", f"{response.status_code}: {response.text[:300]}"
    event_id = response.json()["event_id"]
    text = httpx.get(f"{url}gradio_api/call/{api}/{event_id}", timeout=timeout).text
    kind, payload = "", None
    for line in text.splitlines():
        if line.startswith("event: "):
            kind = line[7:].strip()
        elif line.startswith("data: ") and kind in ("complete", "error"):
            payload = json.loads(line[6:])
    if kind == "error":
        return "error", (payload or {}).get("error") if isinstance(payload, dict) else payload
    return kind, payload


def file_data(path: str, orig_name: str | None = None) -> dict[str, Any]:
    data = {"path": path, "meta": {"_type": "gradio.FileData"}}
    if orig_name is not None:
        data["orig_name"] = orig_name
    return data


TRAVERSAL_NAMES: list[str | bytes] = [
    "../../evil.dcm", "../../../../../../tmp/medm2g-evil.dcm", "/tmp/medm2g-evil-abs.dcm", "..\\..\\evil.dcm",
    b"evil\x00.dcm", "evil\x00/../../x.dcm", "x" * 300 + ".dcm", "..", ".", "<img src=x onerror=alert(1)>.dcm",
]
BAD_FILES: list[tuple[str, bytes, str]] = [  # name, content, what the message must say
    ("setup.exe", b"MZ\x90\x00" + b"\x00" * 200, "unsupported file type '.exe'"),
    ("notes.txt", b"FINDINGS: none.", "unsupported file type '.txt'"),
    ("page.html", b"<html><script>alert(1)</script></html>", "unsupported file type '.html'"),
    ("scan.png", b"<svg xmlns='http://www.w3.org/2000/svg'><script>alert(1)</script></svg>", "is not a PNG file"),
    ("scan.dcm", b"<html><body>not a scan</body></html>", "is not a DICOM file"),
    ("archive.zip", b"PK\x03\x04" + b"\x00" * 200, "unsupported file type '.zip'"),
    ("scan.nii.gz", b"PK\x03\x04" + b"\x00" * 200, "is not a NIfTI file"),
    ("image", b"#!/bin/sh\nrm -rf /\n", "is not a recognised image"),
]


def upload_probes(server: DemoServer) -> list[dict[str, Any]]:
    """Abusive uploads and inputs, each with ``ok`` (the server behaved) and what happened.

    Traversal-style names must either be refused (4xx) or stored inside the server's temp folder under a
    plain name; a file the user did not upload (/etc/passwd, a repository file) must not be read; wrong file
    types must come back as the reader's message, not a traceback; downloads keep the app's names.
    """
    url, temp = server.url, server.temp.resolve()
    probes: list[dict[str, Any]] = []
    example = Path(server.info["examples"]["chest_ct.dcm"]).read_bytes()

    def inside(path: str) -> bool:
        return Path(path).resolve().is_relative_to(temp)

    for name in TRAVERSAL_NAMES:
        status, body = upload(url, name, example)
        shown = name if isinstance(name, str) else name.decode(errors="replace")
        entry: dict[str, Any] = {"probe": f"upload named {shown[:60]!r}", "status": status}
        if status == 200:
            path = body[0]
            entry["stored_as"] = Path(path).name[:80]
            stored_ok = inside(path) and "/" not in Path(path).name and "\0" not in path and len(Path(path).name.encode()) <= 255
            kind, outputs = call(url, "ct_to_xray", [file_data(path, orig_name=shown), 2, 2.0, 1])
            names = [Path(f["path"]).name for f in (outputs[1] if kind == "complete" else [])]
            entry["generation"] = kind
            entry["downloads"] = names
            entry["ok"] = stored_ok and kind == "complete" and all(DOWNLOAD_NAME.fullmatch(n) for n in names) and all(
                inside(f["path"]) for f in outputs[1])
        else:
            entry["ok"] = 400 <= status < 500  # refused, not a server error
            entry["message"] = str(body)[:200]
        probes.append(entry)

    for path in ("/etc/passwd", str(ROOT / "pyproject.toml"), "../../../../etc/passwd"):
        kind, message = call(url, "ct_to_xray", [file_data(path), 2, 2.0, 1])
        probes.append({"probe": f"input path not uploaded: {path}", "result": kind, "message": message,
                       "ok": kind == "error" and "pyproject" not in str(message) and "root:" not in str(message)})

    for name, content, expected in BAD_FILES:
        status, body = upload(url, name, content)
        if status != 200:
            probes.append({"probe": f"wrong type {name}", "status": status, "ok": False})
            continue
        kind, message = call(url, "ct_to_xray", [file_data(body[0]), 2, 2.0, 1])
        probes.append({"probe": f"wrong type {name}", "result": kind, "message": message,
                       "ok": kind == "error" and isinstance(message, str) and expected in message
                       and "Traceback" not in message and str(temp) not in message})

    limit = _max_upload_bytes()
    status, body = upload(url, "huge.dcm", b"\0" * (limit + 1024))
    probes.append({"probe": "upload over the size limit", "status": status, "message": str(body)[:200],
                   "ok": status == 413 and "maximum allowed size" in str(body)})
    return probes


def _max_upload_bytes() -> int:
    text = (ROOT / "space" / "app.py").read_text()
    match = re.search(r"^MAX_UPLOAD_BYTES = (.+)$", text, re.MULTILINE)
    return int(eval(match.group(1), {"__builtins__": {}}))  # a constant expression such as 50 * 1024 * 1024


# ------------------------------------------------------------------------------------------ snapshots


def snapshot(roots: list[Path], exclude: list[Path]) -> dict[str, tuple[int, int]]:
    """``path -> (mtime_ns, size)`` of every file under ``roots`` (symlinks not followed)."""
    skip = {str(p.resolve()) for p in exclude}
    files: dict[str, tuple[int, int]] = {}
    stack = [str(r.resolve()) for r in roots if r.exists()]
    seen: set[str] = set()
    while stack:
        folder = stack.pop()
        if folder in seen or folder in skip:
            continue
        seen.add(folder)
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            if entry.name not in SNAPSHOT_EXCLUDE:
                                stack.append(entry.path)
                        else:
                            st = entry.stat(follow_symlinks=False)
                            files[entry.path] = (st.st_mtime_ns, st.st_size)
                    except OSError:
                        continue
        except OSError:
            continue
    return files


def changed(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> list[str]:
    """Files created or modified between two snapshots."""
    return sorted(p for p, stat in after.items() if before.get(p) != stat)


# ----------------------------------------------------------------------------------------------- run


def mib(value: int | None) -> float | None:
    return None if value is None else round(value / 2**20, 1)


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    server = DemoServer(args.model, queue_size=args.queue_size, start_timeout=args.start_timeout)
    roots = {"repository": ROOT, "home": Path.home(), "cwd": Path.cwd(), "server_cwd": server.cwd}
    if args.no_home_snapshot:
        del roots["home"]
    exclude = [server.temp, server.control, server.client_dir, Path(server.log_path)]
    before = snapshot(list(roots.values()), exclude)
    summary: dict[str, Any] = {"model": args.model, "requests": args.requests, "clients": args.clients, "steps": args.steps,
                               "request_timeout_s": args.request_timeout, "memory_tolerance": args.memory_tolerance}
    failures: list[str] = []
    audit_outside: dict[str, str] = {}
    try:
        try:
            server.start()
        except RuntimeError as error:
            summary.update(ok=False, exit=2, failures=[str(error)])
            return summary
        summary["startup_s"] = round(time.monotonic() - started, 1)
        # Warm-up: one request per tab, so that lazy imports and first-call allocations are in the baseline.
        warm = fire(server.url, server.info["examples"], server.client_dir, len(TABS), 1, args.steps,
                    args.request_timeout, args.request_timeout * len(TABS), first_index=10_000)
        summary["warmup"] = {"served": warm.served, "failed": warm.failed, "failures": warm.failures}
        failures += [f"warm-up: {f}" for f in warm.failures]
        if args.probes:
            probes = upload_probes(server)
            summary["upload_probes"] = probes
            failures += [f"upload probe failed: {p}" for p in probes if not p["ok"]]
        baseline = server.settle(args.settle)
        sampler = PeakSampler(server.pid)
        sampler.start()
        load, rounds, settled = LoadResult(per_tab={tab: {"served": 0, "rejected": 0, "failed": 0} for tab in TABS}), [], {}
        for number in range(args.rounds):  # more than one round: is the settled RSS still climbing?
            part = fire(server.url, server.info["examples"], server.client_dir, args.requests, args.clients, args.steps,
                        args.request_timeout, args.deadline, first_index=number * args.requests)
            load.merge(part)
            settled = server.settle(args.settle) if server.alive() else {}
            rounds.append({"served": part.served, "rejected": part.rejected, "failed": part.failed,
                           "wall_s": round(part.wall_s, 1), "rss_after_settle_mib": mib(settled.get("rss"))})
            if not settled:
                break
        peak = sampler.stop()
        alive = server.alive()
        latencies = sorted(load.latencies)
        ratio = (settled["rss"] / baseline["rss"]) if settled.get("rss") and baseline.get("rss") else None
        summary.update({
            "served": load.served, "rejected_queue_full": load.rejected, "failed": load.failed,
            "per_tab": load.per_tab, "failures": load.failures[:50], "rejections": load.rejections[:20],
            "download_problems": load.download_problems[:50],
            "load_wall_s": round(load.wall_s, 1), "throughput_per_s": round(load.served / load.wall_s, 2) if load.wall_s else None,
            "latency_s": {"p50": round(latencies[len(latencies) // 2], 2), "max": round(latencies[-1], 2)} if latencies else None,
            "server_alive_after": alive,
            "rounds": rounds if args.rounds > 1 else None,
            "memory_mib": {"baseline": mib(baseline.get("rss")), "peak_sampled": mib(peak),
                           "after_settle": mib(settled.get("rss")), "after_gc_before_trim": mib(settled.get("rss_after_gc")),
                           "vm_hwm_incl_startup": mib(vm_hwm(server.pid)),
                           "ratio_after_over_baseline": round(ratio, 3) if ratio else None,
                           "settle": f"gc.collect() + malloc_trim(0) (done: {settled.get('malloc_trim')}) in the server, then {args.settle:g} s",
                           "rss_source": "psutil" if _has_psutil() else "/proc"},
        })
        failures += [f"request failed: {f}" for f in load.failures]
        failures += [f"download: {p}" for p in load.download_problems]
        if load.served + load.rejected + load.failed != args.requests * args.rounds:
            failures.append(f"only {load.served + load.rejected + load.failed} of {args.requests * args.rounds} requests accounted for")
        if not alive:
            failures.append(f"the server died (exit {server.proc.returncode}): {server.log_tail(1500)}")
        if ratio is None or ratio > args.memory_tolerance:
            failures.append(f"settled RSS {mib(settled.get('rss'))} MiB is {ratio and round(ratio, 3)} x the baseline "
                            f"{mib(baseline.get('rss'))} MiB (tolerance {args.memory_tolerance} x)")
        audit_outside = dict(settled.get("writes_outside_temp") or {})
        summary["writes_inside_temp"] = settled.get("writes_inside_temp")
    finally:
        summary["server_exit_code"] = server.stop()
        summary["server_log_tail"] = server.log_tail(1500) if failures or not summary.get("served") else ""
    after = snapshot(list(roots.values()), exclude)
    new = changed(before, after)
    cwd_prefix = str(server.cwd.resolve()) + os.sep
    attributed = sorted({p for p in new if p in audit_outside or p.startswith(cwd_prefix)} | set(audit_outside))
    unattributed = [p for p in new if p not in attributed]
    summary["files_outside_temp"] = attributed
    summary["unattributed_changes"] = {"count": len(unattributed), "paths": unattributed[:40],
                                       "note": "changed during the run by other processes (not seen written by the server)"}
    summary["snapshot_roots"] = {k: str(v) for k, v in roots.items()}
    summary["server_temp_dir"] = str(server.temp)
    if attributed:
        failures.append(f"{len(attributed)} file(s) written outside the server's temp folder: {attributed[:10]}")
    if args.strict_files and unattributed:
        failures.append(f"--strict-files: {len(unattributed)} unattributed change(s): {unattributed[:10]}")
    summary["wall_s"] = round(time.monotonic() - started, 1)
    summary["failures_all"] = failures[:100]
    summary["ok"] = not failures
    summary["exit"] = 0 if not failures else 1
    if not args.keep:
        server.cleanup()
    else:
        summary["run_dir"] = str(server.run_dir)
    return summary


def _has_psutil() -> bool:
    try:
        import psutil  # noqa: F401
    except ImportError:
        return False
    return True


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="'tiny' (the test pipeline built in code) or a checkpoint such as medm2g-tiny")
    parser.add_argument("--requests", type=int, default=50, help="generation requests (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the load this many times, settling after each (default %(default)s)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent gradio_client clients (default %(default)s)")
    parser.add_argument("--steps", type=int, default=3, help="inference steps per request (default %(default)s)")
    parser.add_argument("--request-timeout", type=float, default=300.0, help="client-side bound per request, s")
    parser.add_argument("--deadline", type=float, default=1800.0, help="client-side bound on the whole load, s")
    parser.add_argument("--start-timeout", type=float, default=300.0, help="bound on the server's startup, s")
    parser.add_argument("--settle", type=float, default=3.0, help="quiet seconds after gc before the RSS reading")
    parser.add_argument("--memory-tolerance", type=float, default=1.25,
                        help="largest accepted settled RSS / baseline RSS (default %(default)s)")
    parser.add_argument("--queue-size", type=int, default=None, help="override the queue's max_size (to exercise 'queue full')")
    parser.add_argument("--no-probes", dest="probes", action="store_false", help="skip the upload-abuse probes")
    parser.add_argument("--no-home-snapshot", action="store_true", help="do not snapshot the home directory")
    parser.add_argument("--strict-files", action="store_true", help="also fail on changes not attributed to the server")
    parser.add_argument("--keep", action="store_true", help="keep the run folder (server temp, log, downloads)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON summary here")
    # The server process (started by the controller).
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--temp", help=argparse.SUPPRESS)
    parser.add_argument("--control", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        return serve(args)
    summary = run(args)
    text = json.dumps(summary, indent=2, default=str)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return summary["exit"]


if __name__ == "__main__":
    sys.exit(main())
