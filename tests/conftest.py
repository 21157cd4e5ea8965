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


# Strict mode (CI sets it): a test that cannot run for lack of ComfyUI (not found, or it does not import) or of
# Chromium fails with the reason instead of skipping. GPU-only tests still skip without a GPU.
STRICT_ENV = "SPARSE_ATTENTION_STRICT"


def strict() -> bool:
    return os.environ.get(STRICT_ENV, "") not in ("", "0")


def give_up(reason: str) -> None:
    """This test cannot run here (``reason``): skip it, or in strict mode fail it."""
    if strict():
        pytest.fail(f"{reason} ({STRICT_ENV} is set: a test that cannot run fails)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def unavailable():
    """:func:`give_up`, for fixtures that find what they need missing (ComfyUI's nodes, Chromium)."""
    return give_up


class ComfyUINotFoundWarning(pytest.PytestWarning):
    """ComfyUI tests were collected but no usable ComfyUI source tree was found: they are skipped (strict: failed)."""


_comfy_missing: dict = {}
_CANNOT_RUN = pytest.StashKey[str]()


def pytest_collection_modifyitems(config, items):
    for item in items:  # (before pytest's own hook deselects by marker: -m "not comfyui_server" sees it)
        if "comfy_server" in item.fixturenames:
            item.add_marker(pytest.mark.comfyui_server)
    no_gpu = not torch.cuda.is_available()
    comfy_items = [item for item in items if "comfyui" in item.keywords]
    if comfy_items:
        path, note = comfy_env.setup()
        if path is None:
            reason = f"needs ComfyUI: {note}. Set {comfy_env.ENV_VAR} to a ComfyUI checkout."
            outcome = "FAILED" if strict() else "SKIPPED"
            _comfy_missing.update(count=len(comfy_items), reason=reason, outcome=outcome)
            warnings.warn(ComfyUINotFoundWarning(f"{len(comfy_items)} ComfyUI integration tests {outcome}: {reason}"))
            for item in comfy_items:
                if not strict():
                    item.add_marker(pytest.mark.skip(reason=reason))
                elif not (no_gpu and "gpu" in item.keywords):  # a GPU test still skips without a GPU
                    item.stash[_CANNOT_RUN] = reason
    if no_gpu:
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


def pytest_report_header(config):
    return comfy_env.find_comfyui()[1]  # which ComfyUI the ComfyUI tests run against


@pytest.hookimpl(tryfirst=True)  # before the test's fixtures are set up
def pytest_runtest_setup(item):
    reason = item.stash.get(_CANNOT_RUN, None)
    if reason:
        give_up(reason)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _comfy_missing:
        terminalreporter.write_sep("!", f"ComfyUI NOT FOUND: integration tests {_comfy_missing['outcome'].lower()}",
                                   red=True, bold=True)
        terminalreporter.write_line(f"{_comfy_missing['count']} ComfyUI tests did not run. {_comfy_missing['reason']}",
                                    red=True)

from server_fixture import comfy_server  # noqa: E402,F401  (a real ComfyUI server, shared by test_server / test_browser)


@pytest.fixture(autouse=True)
def share_alone_bounds_tiny_calls(monkeypatch):
    """The tests' calls are tiny: without the transient floor (core.memory) their planners still work a few heads at
    a time, as a 720p call's do. tests/test_memory.py checks the floor itself."""
    from pack import import_pack

    monkeypatch.setattr(import_pack("core.memory"), "TRANSIENT_FLOOR", 0)


class WorkflowCheckUnavailable(pytest.PytestWarning):
    """ComfyUI was found but its node classes could not be loaded: the tests that need them are skipped (strict:
    failed)."""


@pytest.fixture(scope="module")
def catalog(unavailable):
    """ComfyUI's and the pack's node definitions (tests/workflow_check.py), for the workflow and browser tests."""
    import workflow_check as wc
    try:
        return wc.load_catalog()
    except wc.ComfyUIUnavailable as why:
        warnings.warn(WorkflowCheckUnavailable(f"workflow checks cannot run: {why}"))
        unavailable(f"needs ComfyUI's node classes: {why}")


@pytest.fixture(scope="module")
def nodes():
    """The pack's nodes package (imports ComfyUI: only for tests marked comfyui)."""
    return comfy_env.pack_nodes()


@pytest.fixture(scope="module")
def bridge(nodes):
    from pack import import_pack

    return import_pack("nodes.bridge")
