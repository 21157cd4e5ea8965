"""The pack in a real ComfyUI server: ``python main.py --cpu`` with the pack in custom_nodes/ under an arbitrary folder
name (tests/server_fixture.py), driven over HTTP as the web page drives it.

* the server starts with the pack imported and nothing failing to import (ComfyUI's own nodes included);
* ``/object_info`` lists every node of the pack with all its inputs, each with a tooltip;
* a tiny Wan 2.1 T2V file in models/diffusion_models/ is loaded by the stock UNETLoader as WAN21_T2V, and a queued
  workflow (UNETLoader -> Radial Mask + Sparse Attention Patch -> KSampler) runs to the end with the sparse path
  really taken (counted by the test-only report node), and nothing in the server log goes wrong.
"""

from __future__ import annotations

import math
import os

import pytest

from pack import import_pack
from server_fixture import PACK_FOLDER, TEST_PACK_FOLDER, TINY_WAN, TINY_WAN_FILE, log_problems

comfyui = pytest.mark.comfyui  # skipped, loudly, without ComfyUI (conftest.py)

STEPS = 4
# 128 x 128 pixels, 17 frames -> latent 16 x 5 x 16 x 16 -> 5 frames of 8 x 8 tokens (320 tokens, five 64-token blocks).
WIDTH = HEIGHT = 128
LENGTH = 17
BLOCK = 64


def pack_nodes():
    return import_pack("nodes")


def section_lines(text: str, header: str) -> list[str]:
    """The lines after ``header`` up to the next blank line."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == header:
            out = []
            for follow in lines[i + 1:]:
                if not follow.strip():
                    break
                out.append(follow)
            return out
    return []


def with_defaults(object_info: dict, class_type: str, inputs: dict) -> dict:
    """The node's API-format inputs: ``inputs`` plus the default of every required widget input not given (so the
    test keeps working when a node gains an input)."""
    info = object_info[class_type]
    full = dict(inputs)
    for name, spec in info["input"].get("required", {}).items():
        if name in full:
            continue
        kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
        if "default" in options:
            full[name] = options["default"]
        elif isinstance(kind, list) and kind:
            full[name] = kind[0]
        elif kind == "COMBO" and options.get("options"):
            full[name] = options["options"][0]
    return {"class_type": class_type, "inputs": full}


def sparse_prompt(object_info: dict) -> dict:
    node = lambda cls, **inputs: with_defaults(object_info, cls, inputs)  # noqa: E731
    return {
        "1": node("UNETLoader", unet_name=TINY_WAN_FILE, weight_dtype="default"),
        "2": node("RadialAttentionMask", decay_factor=0.2, block_size=BLOCK, attention_sink=True, text_dense=True),
        "3": node("SparseAttentionPatch", model=["1", 0], method=["2", 0], dense_steps=0.25, sparse_end=1.0,
                  dense_layers=1, backend="reference", verbose=True),
        "4": node("SVATestWanConditioning", seed=1, tokens=16, width=TINY_WAN["text_dim"]),
        "5": node("SVATestWanConditioning", seed=2, tokens=16, width=TINY_WAN["text_dim"]),
        "6": node("EmptyHunyuanLatentVideo", width=WIDTH, height=HEIGHT, length=LENGTH, batch_size=1),
        "7": node("KSampler", model=["3", 0], positive=["4", 0], negative=["5", 0], latent_image=["6", 0], seed=7,
                  steps=STEPS, cfg=3.0, sampler_name="euler", scheduler="simple", denoise=1.0),
        "8": node("SVATestSparseReport", model=["3", 0], samples=["7", 0]),
    }


# ------------------------------------------------------------------------------------------------------------------

def _traceback(root: str, where: str, exception: str) -> list[str]:
    return ["Traceback (most recent call last):", f'  File "{root}/nodes.py", line 2131, in load_custom_node',
            "    module_spec.loader.exec_module(module)", f'  File "{where}", line 4, in <module>', "    import x",
            exception, ""]


def _tagged(level: str, lines: list[str]) -> list[str]:
    """A log record as ComfyUI 0.33 writes it: its first line starts with the level, coloured."""
    return [f"\x1b[1m\x1b[33m[{level}]\x1b[0m {lines[0]}", *lines[1:]]


def test_log_rules():
    """What the server-log check reports (a traceback with the import it broke, a failed import of any node file,
    ComfyUI's own included, an exception while running a prompt, an ERROR record) and what it lets through, in
    ComfyUI 0.3's plain log lines and 0.33's level-tagged ones."""
    root = "/opt/ComfyUI"
    normal = ["got prompt", "Prompt executed in 0.35 seconds"]
    assert log_problems("\n".join(normal)) == []
    assert log_problems("\n".join(_tagged("INFO", [line])[0] for line in normal)) == []

    ours = f"/tmp/base/custom_nodes/{PACK_FOLDER}"
    broken_pack = (_traceback(root, f"{ours}/__init__.py", "ModuleNotFoundError: No module named 'triton'")
                   + [f"Cannot import {ours} module for custom nodes: No module named 'triton'", "",
                      "Import times for custom nodes:", f"   0.0 seconds (IMPORT FAILED): {ours}"])
    problems = log_problems("\n".join(broken_pack))
    assert len(problems) == 2 and "triton" in problems[0] and "Cannot import" in problems[0], problems
    assert "IMPORT FAILED" in problems[1], problems

    extra = f"{root}/comfy_extras/nodes_canny.py"
    missing_extra = (_tagged("WARNING", _traceback(root, extra, "ModuleNotFoundError: No module named 'kornia'"))
                     + _tagged("WARNING", [f"Cannot import {extra} module for custom nodes: No module named 'kornia'"])
                     + _tagged("WARNING", ["IMPORT FAILED: nodes_canny.py"]))
    problems = log_problems("\n".join(missing_extra))
    assert len(problems) == 2 and "kornia" in problems[0] and problems[1] == "IMPORT FAILED: nodes_canny.py", problems

    run_failure = ["got prompt", "!!! Exception during processing !!! boom"] + _traceback(
        root, f"{ours}/nodes/bridge.py", "RuntimeError: boom")
    assert len(log_problems("\n".join(run_failure))) == 2
    assert log_problems(_tagged("ERROR", ["something went wrong"])[0]) == ["something went wrong"]

    rejected = _tagged("ERROR", ["Failed to validate prompt for output 14:"])
    assert log_problems(rejected[0]) == ["Failed to validate prompt for output 14:"]
    assert log_problems(rejected[0], allow=(r"^Failed to validate prompt for output",)) == []


@comfyui
def test_server_started_with_the_pack(comfy_server):
    startup = comfy_server.log_text()[comfy_server.start_offset:comfy_server.ready_offset]
    imported = section_lines(startup, "Import times for custom nodes:")
    for folder in (PACK_FOLDER, TEST_PACK_FOLDER):
        mine = [line for line in imported if line.rstrip().endswith((os.sep + folder, "/" + folder))]
        assert mine, f"{folder} is not in ComfyUI's custom-node import list {imported}\n{comfy_server.log_tail()}"
        assert "IMPORT FAILED" not in mine[0], f"ComfyUI could not import {folder}\n{comfy_server.log_tail(120)}"
    problems = comfy_server.problems(since=comfy_server.start_offset, until=comfy_server.ready_offset)
    assert not problems, "server start-up log has problems:\n\n" + "\n\n".join(problems)


@comfyui
def test_object_info_lists_every_node_with_tooltips(comfy_server):
    nodes = pack_nodes()
    info = comfy_server.get("/object_info")
    assert nodes.NODE_CLASS_MAPPINGS, "the pack registers no nodes"
    for name, cls in nodes.NODE_CLASS_MAPPINGS.items():
        assert name in info, f"/object_info has no {name}"
        served = info[name]
        assert served["python_module"] == f"custom_nodes.{PACK_FOLDER}", served["python_module"]
        assert served["display_name"] == nodes.NODE_DISPLAY_NAME_MAPPINGS.get(name, name)
        assert served["description"], f"{name} has no description"
        assert served["output"] == list(cls.RETURN_TYPES)
        declared = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            want = list(declared.get(section, {}))
            got = list(served["input"].get(section, {}))
            assert got == want, f"{name}.{section}: served {got}, declared {want}"
            for input_name, spec in served["input"].get(section, {}).items():
                options = spec[1] if len(spec) > 1 else {}
                tooltip = options.get("tooltip", "")
                assert isinstance(tooltip, str) and tooltip.strip(), f"{name}.{input_name} has no tooltip"


@comfyui
def test_tiny_wan_file_is_detected_as_wan21_t2v(comfy_server):
    import comfy.model_detection
    import comfy.utils

    sd = comfy.utils.load_torch_file(str(comfy_server.models_dir / "diffusion_models" / TINY_WAN_FILE))
    config = comfy.model_detection.model_config_from_unet(sd, "")
    assert type(config).__name__ == "WAN21_T2V"
    assert config.unet_config["dim"] == TINY_WAN["dim"] and config.unet_config["num_heads"] == TINY_WAN["dim"] // 128
    assert config.unet_config["num_layers"] == TINY_WAN["num_layers"]
    served = comfy_server.get("/object_info/UNETLoader")["UNETLoader"]["input"]["required"]["unet_name"][0]
    assert TINY_WAN_FILE in served, f"UNETLoader does not list the tiny Wan file: {served}"


@comfyui
def test_queued_wan_workflow_runs_sparse(comfy_server):
    core = import_pack("core")
    info = comfy_server.get("/object_info")
    prompt = sparse_prompt(info)
    start = comfy_server.log_offset()
    entry = comfy_server.run_prompt(prompt, timeout=180)
    log_part = comfy_server.log_text()[start:]

    status = entry["status"]
    assert status["status_str"] == "success" and status["completed"], (
        f"prompt failed: {status.get('messages')}\n{comfy_server.log_tail()}")
    assert "8" in entry["outputs"], f"the report node left no output: {entry['outputs']}"
    report = entry["outputs"]["8"]["sparse_attention"][0]

    layers = TINY_WAN["num_layers"]
    schedule = core.SparseSchedule(dense_steps=0.25, sparse_end=1.0, dense_layers=1)
    expected_sparse = sum(schedule.is_sparse(step, STEPS, layer) for step in range(STEPS) for layer in range(layers))
    assert expected_sparse > 0

    assert report["model_config"] == "WAN21_T2V" and report["diffusion_model"] == "WanModel", report
    assert (report["dim"], report["num_heads"], report["num_layers"]) == (TINY_WAN["dim"], 2, layers), report
    assert report["patched"], report
    assert report["sparse_calls"] == expected_sparse, report
    assert report["dense_calls"] == STEPS * layers - expected_sparse, report
    assert 0 < report["mean_density"] < 1, report
    assert not report["fallbacks"], f"the sparse path fell back to dense: {report['fallbacks']}"
    assert report["latent_shape"] == [1, 16, (LENGTH - 1) // 4 + 1, HEIGHT // 8, WIDTH // 8], report
    assert report["latent_finite"] and math.isfinite(report["latent_std"]) and report["latent_std"] > 0, report

    assert "Prompt executed in" in log_part, comfy_server.log_tail()
    problems = comfy_server.problems(since=start)
    assert not problems, "server log of the run has problems:\n\n" + "\n\n".join(problems)


@comfyui
def test_queued_workflow_with_the_check_returns_its_picture(comfy_server):
    """Sparse Attention Check between the patch and the sampler, the Inspector's check output to Preview Image: the
    prompt runs through the HTTP API, and the check's picture comes back from the server."""
    import io

    import requests
    from PIL import Image

    info = comfy_server.get("/object_info")
    prompt = sparse_prompt(info)
    node = lambda cls, **inputs: with_defaults(info, cls, inputs)  # noqa: E731
    prompt["9"] = node("SparseAttentionCheck", model=["3", 0], steps="0.5", rows=32, compare_step=False, floor=0.8)
    prompt["7"]["inputs"]["model"] = ["9", 0]
    prompt["10"] = node("SparseAttentionInspector", model=["9", 0], samples=["7", 0], layer=1, head=0, max_size=512)
    prompt["11"] = node("PreviewImage", images=["10", 3])
    entry = comfy_server.run_prompt(prompt, timeout=180)
    status = entry["status"]
    assert status["status_str"] == "success", f"prompt failed: {status.get('messages')}\n{comfy_server.log_tail()}"
    shown = entry["outputs"]["11"]["images"][0]
    response = requests.get(comfy_server.url + "/view", params=shown, timeout=30)
    assert response.status_code == 200, response.text[:500]
    picture = Image.open(io.BytesIO(response.content))
    assert picture.width == 512 and picture.height > 200
