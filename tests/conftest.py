import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter; it must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))

import comfy_env  # noqa: E402  (cheap: ComfyUI itself is imported only when a ComfyUI test is collected)


class ComfyUINotFoundWarning(pytest.PytestWarning):
    """ComfyUI tests were collected but no usable ComfyUI source tree was found: they are skipped."""


_comfy_skipped: dict = {}


def pytest_collection_modifyitems(config, items):
    comfy_items = [item for item in items if "comfyui" in item.keywords]
    if comfy_items:
        path, note = comfy_env.setup()
        if path is None:
            reason = f"needs ComfyUI: {note}. Set {comfy_env.ENV_VAR} to a ComfyUI checkout."
            _comfy_skipped.update(count=len(comfy_items), reason=reason)
            warnings.warn(ComfyUINotFoundWarning(f"{len(comfy_items)} ComfyUI integration tests SKIPPED: {reason}"))
            skip = pytest.mark.skip(reason=reason)
            for item in comfy_items:
                item.add_marker(skip)
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _comfy_skipped:
        terminalreporter.write_sep("!", "ComfyUI NOT FOUND: integration tests skipped", red=True, bold=True)
        terminalreporter.write_line(f"{_comfy_skipped['count']} ComfyUI tests did not run. {_comfy_skipped['reason']}",
                                    red=True)

from server_fixture import comfy_server  # noqa: E402,F401  (a real ComfyUI server, shared by test_server / test_browser)


@pytest.fixture(scope="module")
def nodes():
    """The pack's nodes package (imports ComfyUI: only for tests marked comfyui)."""
    return comfy_env.pack_nodes()


@pytest.fixture(scope="module")
def bridge(nodes):
    from pack import import_pack

    return import_pack("nodes.bridge")
