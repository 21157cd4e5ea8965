"""A real ComfyUI server for the end-to-end tests (tests/test_server.py, tests/test_browser.py).

``comfy_server`` (session-scoped, re-exported by conftest.py so both test files share one server) starts
``python main.py --cpu`` of the ComfyUI found by comfy_env (DESIGN.md's search order) with everything it writes in a
temporary base directory: models/, custom_nodes/, input/, output/, temp/, user/ and its database. Nothing touches
the ComfyUI tree's own folders. Its custom_nodes/ holds two symlinks:

* ``sparse-video-attention-under-test`` -> this repository (any folder name must work: ComfyUI imports the pack by
  its path);
* ``sva-test-only-nodes`` -> tests/test_only_nodes (random Wan conditioning and a report node; never shipped).

models/diffusion_models/ holds a tiny Wan 2.1 T2V file built from ComfyUI's own WanModel class (see
:func:`write_tiny_wan`), so a workflow can sample a real (tiny) Wan model through UNETLoader.

The server runs in its own process group; it is stopped (SIGTERM, then SIGKILL) at the end of the session and at
interpreter exit, whatever happens. Its output goes to ``server.log`` in the base directory; failures quote its tail.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import comfy_env
from headless_browser import own_group_dying_with_parent
from pack import REPO_ROOT

PACK_FOLDER = "sparse-video-attention-under-test"
TEST_PACK_FOLDER = "sva-test-only-nodes"
TEST_PACK_SOURCE = Path(__file__).resolve().parent / "test_only_nodes"
TINY_WAN_FILE = "sva_tiny_wan2.1_t2v.safetensors"

# ComfyUI's Wan detection (comfy/model_detection.py) reads dim from head.modulation and sets num_heads = dim // 128,
# freq_dim = 256; text_dim is the WanModel default (4096, umT5's width). So: dim 256 = 2 heads of 128.
TINY_WAN = dict(dim=256, ffn_dim=256, num_layers=3, text_dim=4096, freq_dim=256, in_dim=16, out_dim=16)

STARTUP_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 15.0

# Settings the frontend reads at start: no first-run template browser, no update popups (the test machine has no
# internet), no minimap over the canvas (the README screenshot).
FRONTEND_SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Notification.ShowVersionUpdates": False,
    "Comfy.Minimap.Visible": False,
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_tiny_wan(path: Path, seed: int = 0) -> dict:
    """Save a tiny Wan 2.1 T2V diffusion model (ComfyUI's WanModel, seeded weights) as safetensors, in the layout of
    the repackaged Wan files (no key prefix). Needs comfy_env.setup() first. Returns the unet config."""
    import comfy.supported_models
    import safetensors.torch

    unet = dict(image_model="wan2.1", model_type="t2v", num_heads=TINY_WAN["dim"] // 128, patch_size=(1, 2, 2),
                eps=1e-6, qk_norm=True, cross_attn_norm=True, window_size=(-1, -1), **TINY_WAN)
    cfg = comfy.supported_models.WAN21_T2V(unet)
    cfg.set_inference_dtype(torch.float32, None)
    base = cfg.get_model({}, device=comfy_env.CPU)
    comfy_env.init_weights(base.diffusion_model, seed)
    state = {k: v.detach().contiguous() for k, v in base.diffusion_model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(state, str(path))
    return unet


# ------------------------------------------------------------------------------------------------------------------
# The server log: what counts as a problem.

_TRACEBACK = "Traceback (most recent call last):"
# ComfyUI 0.33 starts each log record with its level, coloured ("\x1b[32m[INFO]\x1b[0m got prompt"); 0.3.x does not.
_ANSI = re.compile(r"\x1b\[[\d;]*m")
_LEVEL = re.compile(r"^\[(DEBUG|DETAIL|INFO|WARNING|ERROR|CRITICAL)\] ?")
_PROBLEM_LINES = [
    re.compile(p) for p in (
        r"\bERROR\b",
        r"!!! Exception during processing",
        r"Failed to validate prompt",
        r"Prompt outputs failed validation",
        r"invalid prompt",
        r"\(IMPORT FAILED\)",  # the custom-node import summary: only our two packs are in this custom_nodes/
        r"(?i)failed to initialize database",
        r"Cannot import",  # a custom node, or one of ComfyUI's own (tests/requirements.txt installs all they import)
        r"IMPORT FAILED",
        r"Exception in thread",
        r"^Skip .* module for custom nodes",
        r"Error while calling comfy_entrypoint",
        r"Error handling request",
    )
]


def _level_and_message(line: str) -> tuple[str | None, str]:
    line = _ANSI.sub("", line)
    level = _LEVEL.match(line)
    return (level[1], line[level.end():]) if level else (None, line)


def log_problems(text: str, allow: tuple[str, ...] = ()) -> list[str]:
    """Problems in a ComfyUI server log, each with its lines: a traceback (with the "Cannot import ..." line that
    names what failed to import, when one follows), a record at ERROR level or above, a line saying something failed
    (_PROBLEM_LINES). ``allow``: regular expressions of lines a caller expects (searched in each line, its level tag
    removed); a traceback is never allowed."""
    records = [_level_and_message(line) for line in text.splitlines()]
    lines = [message for _, message in records]
    problems: list[str] = []
    i = 0
    while i < len(lines):
        if lines[i].strip() == _TRACEBACK:
            start = i
            i += 1
            # Frames are indented; chained tracebacks repeat the header; the first unindented line is the exception.
            while i < len(lines) and (lines[i].startswith(" ") or not lines[i].strip() or lines[i].strip() == _TRACEBACK
                                      or lines[i].startswith("During handling") or lines[i].startswith("The above")):
                i += 1
            end = i + 1
            while end < len(lines) and not lines[end].strip():
                end += 1
            if end < len(lines) and lines[end].startswith("Cannot import"):
                i = end
            problems.append("\n".join(lines[start:i + 1]))
        elif ((records[i][0] in ("ERROR", "CRITICAL") or any(p.search(lines[i]) for p in _PROBLEM_LINES))
              and not any(re.search(a, lines[i]) for a in allow)):
            problems.append(lines[i])
        i += 1
    return problems


# ------------------------------------------------------------------------------------------------------------------

class ComfyServer:
    """One ComfyUI server process in its own process group, its base directory and its log."""

    def __init__(self, comfy_root: Path, base: Path, python: str = sys.executable):
        self.comfy_root = Path(comfy_root)
        self.base = Path(base)
        self.python = python
        self.log_path = self.base / "server.log"
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.startup_s: float | None = None
        self.start_offset = 0  # log length when the (last) start attempt began
        self.ready_offset = 0  # log length when the server answered: what follows belongs to the tests

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def models_dir(self) -> Path:
        return self.base / "models"

    def prepare(self) -> None:
        for sub in ("custom_nodes", "models/diffusion_models", "input", "output", "temp", "user/default"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        for name, target in ((PACK_FOLDER, REPO_ROOT), (TEST_PACK_FOLDER, TEST_PACK_SOURCE)):
            link = self.base / "custom_nodes" / name
            if not link.exists():
                link.symlink_to(target, target_is_directory=True)
        example = self.comfy_root / "input" / "example.png"  # what a fresh ComfyUI's LoadImage shows
        if example.is_file() and not (self.base / "input" / example.name).exists():
            shutil.copyfile(example, self.base / "input" / example.name)
        settings = self.base / "user" / "default" / "comfy.settings.json"
        settings.write_text(json.dumps(FRONTEND_SETTINGS, indent=1))

    def command(self) -> list[str]:
        return [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                "--base-directory", str(self.base), "--user-directory", str(self.base / "user"),
                "--database-url", f"sqlite:///{self.base / 'user' / 'comfyui.db'}",
                "--disable-auto-launch", "--preview-method", "none", "--log-stdout"]

    def start(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        import requests

        self.prepare()
        atexit.register(self.stop)  # a finalizer that never ran (an interrupted session) still stops the server
        for attempt in range(3):  # the free port may be taken between probing it and the server binding it
            self.port = free_port()
            env = dict(os.environ, PYTHONUNBUFFERED="1", COMFYUI_PATH=str(self.comfy_root))
            self.start_offset = self.log_offset()
            with open(self.log_path, "ab") as log:
                log.write(f"\n=== {' '.join(self.command())}\n".encode())
                log.flush()
                t0 = time.monotonic()
                self.proc = subprocess.Popen(self.command(), cwd=self.comfy_root, env=env, stdout=log,
                                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             preexec_fn=own_group_dying_with_parent)
            deadline = t0 + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    if requests.get(self.url + "/system_stats", timeout=2).status_code == 200:
                        self.startup_s = time.monotonic() - t0
                        self.ready_offset = len(self.log_text())
                        return
                except requests.RequestException:
                    pass
                time.sleep(0.25)
            code = self.proc.poll()
            self.stop()
            if (code is not None and "address already in use" in self.log_text()[self.start_offset:].lower()
                    and attempt < 2):
                continue
            why = f"exited with code {code}" if code is not None else f"did not answer within {timeout:.0f} s"
            raise RuntimeError(f"ComfyUI server {why}.\n{self.log_tail()}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
        try:  # the whole group: nothing the server started may outlive it
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=STOP_TIMEOUT_S)

    # -- log ------------------------------------------------------------------------------------------------------

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        tail = self.log_text().splitlines()[-lines:]
        return f"--- last {len(tail)} lines of {self.log_path} ---\n" + "\n".join(tail)

    def log_offset(self) -> int:
        return len(self.log_text())

    def problems(self, since: int = 0, until: int | None = None, allow: tuple[str, ...] = ()) -> list[str]:
        return log_problems(self.log_text()[since:until], allow)

    # -- HTTP -----------------------------------------------------------------------------------------------------

    def get(self, path: str, timeout: float = 30):
        import requests
        response = requests.get(self.url + path, timeout=timeout)
        assert response.status_code == 200, f"GET {path}: {response.status_code} {response.text[:2000]}\n{self.log_tail()}"
        return response.json()

    def post(self, path: str, payload: dict, timeout: float = 30):
        import requests
        response = requests.post(self.url + path, json=payload, timeout=timeout)
        assert response.status_code == 200, (f"POST {path}: {response.status_code} {response.text[:4000]}\n"
                                             f"{self.log_tail()}")
        return response.json()

    def run_prompt(self, prompt: dict, timeout: float = 120) -> dict:
        """Queue an API-format prompt and wait for its /history entry; returns the entry (status, outputs)."""
        prompt_id = self.post("/prompt", {"prompt": prompt, "client_id": "sva-tests"})["prompt_id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and (
                    entry["status"].get("status_str") in ("success", "error")):
                return entry
            if self.proc is None or self.proc.poll() is not None:
                raise AssertionError(f"the ComfyUI server died while running prompt {prompt_id}\n{self.log_tail()}")
            time.sleep(0.25)
        raise AssertionError(f"prompt {prompt_id} did not finish within {timeout:.0f} s\n{self.log_tail()}")


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory, unavailable):
    """A started ComfyUI server with the pack, the test-only pack and a tiny Wan model (see the module docstring)."""
    root, note = comfy_env.setup()
    if root is None:
        unavailable(f"needs ComfyUI: {note}")
    server = ComfyServer(root, tmp_path_factory.mktemp("comfy_server"))
    server.prepare()
    server.tiny_wan_config = write_tiny_wan(server.models_dir / "diffusion_models" / TINY_WAN_FILE)
    try:
        server.start()
        yield server
    finally:
        server.stop()
