"""The shipped workflows (workflows/*.json, ComfyUI UI format) against the real node definitions.

Every JSON in workflows/ is checked (tests/workflow_check.py says how): node types exist in ComfyUI (nodes.py +
comfy_extras) or this pack, links are consistent and typed, required inputs are linked or set, widget values are in
the order the frontend makes the widgets (dynamic combos expanded, trailing optional defaults) and accepted (combos,
min / max, booleans), and ComfyUI's own server-side validation accepts the prompt the frontend would queue.
Model-file names are free (they depend on the local models folders) but must be named, with their folder, in the
workflow's notes.

The set of workflows is checked too: one per supported model family (recognised by the diffusion model files its
loaders name and the LoRA files applied to them), each with the reference Radial settings of its family (a
step-distilled family: also its LoRA's steps and cfg, and the dense steps its schedule keeps), exactly one
dense-vs-sparse comparison that
is fair (same model, prompt, latent, seed and sampler settings on both sides), every file named in README.md, and
ComfyUI's template browser lists and serves every file of workflows/ (app/custom_node_manager.py, with the pack in a
temporary custom_nodes folder).

Needs ComfyUI (found as DESIGN.md says); without it the ComfyUI tests are skipped loudly, or fail in strict mode
(conftest.py). ComfyUI's node classes are loaded once per session (about 10-15 s, most of it importing ComfyUI).
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import os
import re
from dataclasses import dataclass, field

import pytest

import workflow_check as wc
from pack import REPO_ROOT, import_pack

comfyui = pytest.mark.comfyui  # skipped, loudly, without ComfyUI (conftest.py)

SHIPPED = ("wan2.1_t2v_1.3b_radial.json", "wan2.1_t2v_14b_radial.json", "wan2.1_i2v_14b_radial.json",
           "wan2.2_a14b_t2v_radial.json", "wan2.2_ti2v_5b_radial.json", "hunyuanvideo_t2v_radial.json",
           "wan2.1_t2v_1.3b_dense_vs_radial.json", "wan2.1_t2v_14b_svg2.json", "hunyuanvideo_t2v_svg2.json",
           "wan2.1_t2v_14b_svg.json", "hunyuanvideo_t2v_svg.json", "wan2.1_t2v_14b_adaspa.json",
           "hunyuanvideo_t2v_adaspa.json", "hunyuanvideo1.5_t2v_720p_radial.json",
           "hunyuanvideo1.5_i2v_720p_radial.json", "kandinsky5_lite_t2v_radial.json", "ltx2_t2v_radial.json")
MUTATION_SOURCE = "wan2.1_t2v_14b_radial.json"  # the broken copies below start from it
FILES = wc.workflow_files()
PARAMS = wc.workflow_params()


@pytest.fixture(autouse=True)
def comfyui_new_enough(request):
    """A workflow's checks against ComfyUI's nodes need the ComfyUI it was made for (wc.min_comfyui)."""
    path = getattr(request.node, "callspec", None) and request.node.callspec.params.get("path")
    if path is not None and "comfyui" in request.keywords:
        why = wc.too_new_for_this_comfyui(path)
        if why:
            pytest.skip(why)
SAMPLER_MODEL_INPUTS = {"KSampler", "KSamplerAdvanced", "BasicGuider", "CFGGuider", "DualCFGGuider", "SamplerCustom"}
LOADERS = {"UNETLoader", "CheckpointLoaderSimple", "UnetLoaderGGUF"}
COMPARISON_MARK = "_dense_vs_"  # the comparison workflow's file name holds it; every other workflow is all sparse
JOIN_NODES = {"ImageStitch", "ImageBatch"}
VIDEO_OUTPUTS = {"SaveVideo", "SaveAnimatedWEBP", "SaveAnimatedPNG", "SaveWEBM"}
LATENT_SIZE_NODES = {"EmptyHunyuanLatentVideo", "WanImageToVideo", "Wan22ImageToVideoLatent",
                     "EmptyHunyuanVideo15Latent", "HunyuanVideo15ImageToVideo", "Kandinsky5ImageToVideo",
                     "Wan22FunControlToVideo", "WanFunInpaintToVideo", "WanSoundImageToVideo", "WanVaceToVideo",
                     "EmptyLTXVLatentVideo"}

WAN_RADIAL = {"decay_factor": 0.2, "attention_sink": True}       # the Radial reference settings for Wan
HUNYUAN_RADIAL = {"decay_factor": 0.95, "attention_sink": False}  # and for HunyuanVideo
WAN_SVG2 = {"preset": "wan_720p"}          # the SVG2 reference settings (720p) for Wan
HUNYUAN_SVG2 = {"preset": "hunyuan_720p"}  # and for HunyuanVideo
# The SVG reference settings (scripts/*_svg.sh of Sparse-VideoGen), with the dense schedule they set on the patch.
WAN_SVG = {"SVGSettings": {"sparsity": 0.3, "attention_sink": True},
           "SparseAttentionPatch": {"dense_steps": 0.2, "dense_layers": 1}}
HUNYUAN_SVG = {"SVGSettings": {"sparsity": 0.25, "attention_sink": False},
               "SparseAttentionPatch": {"dense_steps": 0.1, "dense_layers": 1}}
# AdaSpa: the paper's defaults, the same for every family.
ADASPA_PAPER = {"recall": 0.8, "search_steps": "0.2, 0.6", "block_size": 64, "min_density": 0.1, "max_density": 0.3}
SETTINGS_NODES = ("RadialAttentionMask", "SVGSettings", "SVG2KMeansSettings", "AdaSpaSearch")
LORA_LOADERS = {"LoraLoaderModelOnly", "LoraLoader"}


@dataclass(frozen=True)
class StepDistilled:
    """A step-distill LoRA's run: the steps and cfg it was distilled for (every sampler of the workflow uses them), and
    the steps of the run the workflow's patches keep dense (what its note promises)."""
    steps: int
    cfg: float
    dense_steps: tuple


# lightx2v's 4-step LoRAs: step 0 lays out the composition and stays dense, steps 1-3 run sparse.
LIGHTX2V_4STEP = StepDistilled(steps=4, cfg=1.0, dense_steps=(0,))


@dataclass(frozen=True)
class Family:
    """A model family the pack supports, as a workflow shows it: the diffusion model files its UNETLoaders name (one
    pattern per model it loads, all of them patched), other model files it needs, node types it needs, the video
    height it renders, and the reference settings of each method: Radial's, SVG2's and SVG's (per node type, with
    the patch's schedule) for the families the references have them for (empty / None: no reference). A family run
    with LoRAs names their files too (one pattern per LoRA; a family without matches only workflows without LoRAs),
    and a step-distill LoRA's run."""
    unets: tuple
    radial: dict
    height: int
    files: tuple = ()
    nodes: frozenset = frozenset()
    svg2: dict = field(default_factory=dict)
    svg: dict | None = None
    loras: tuple = ()
    distilled: StepDistilled | None = None


FAMILIES = {
    "Wan 2.1 T2V 1.3B": Family((r"wan2\.1_t2v_1\.3b",), WAN_RADIAL, 480, nodes=frozenset({"EmptyHunyuanLatentVideo"})),
    "Wan 2.1 T2V 14B": Family((r"wan2\.1_t2v_14b",), WAN_RADIAL, 720, nodes=frozenset({"EmptyHunyuanLatentVideo"}),
                              svg2=WAN_SVG2, svg=WAN_SVG),
    "Wan 2.1 I2V 14B": Family((r"wan2\.1_i2v_720p_14b",), WAN_RADIAL, 720, files=(r"clip_vision_h",),
                              nodes=frozenset({"CLIPVisionLoader", "CLIPVisionEncode", "LoadImage",
                                               "WanImageToVideo"})),
    "Wan 2.2 A14B T2V": Family((r"wan2\.2_t2v_high_noise_14b", r"wan2\.2_t2v_low_noise_14b"), WAN_RADIAL, 720,
                               nodes=frozenset({"KSamplerAdvanced"})),
    "Wan 2.1 T2V 14B, lightx2v 4-step LoRA": Family((r"wan2\.1_t2v_14b",), WAN_RADIAL, 720,
                                                   nodes=frozenset({"EmptyHunyuanLatentVideo"}),
                                                   loras=(r"lightx2v_t2v_14b_cfg_step_distill",),
                                                   distilled=LIGHTX2V_4STEP),
    "Wan 2.2 A14B T2V, lightx2v 4-step LoRAs": Family((r"wan2\.2_t2v_high_noise_14b", r"wan2\.2_t2v_low_noise_14b"),
                                                      WAN_RADIAL, 720, nodes=frozenset({"KSamplerAdvanced"}),
                                                      loras=(r"wan2\.2_t2v_lightx2v_4steps_lora.*high_noise",
                                                             r"wan2\.2_t2v_lightx2v_4steps_lora.*low_noise"),
                                                      distilled=LIGHTX2V_4STEP),
    "Wan 2.2 TI2V 5B": Family((r"wan2\.2_ti2v_5b",), WAN_RADIAL, 704, files=(r"wan2\.2_vae",),
                              nodes=frozenset({"Wan22ImageToVideoLatent", "LoadImage"})),
    "Wan 2.2 A14B Fun Control": Family((r"wan2\.2_fun_control_high_noise_14b", r"wan2\.2_fun_control_low_noise_14b"),
                                       WAN_RADIAL, 720, nodes=frozenset({"KSamplerAdvanced", "Wan22FunControlToVideo",
                                                                         "LoadImage", "LoadVideo"})),
    "Wan 2.2 A14B Fun Inpaint": Family((r"wan2\.2_fun_inpaint_high_noise_14b", r"wan2\.2_fun_inpaint_low_noise_14b"),
                                       WAN_RADIAL, 720, nodes=frozenset({"KSamplerAdvanced", "WanFunInpaintToVideo",
                                                                         "LoadImage"})),
    "Wan 2.2 S2V 14B": Family((r"wan2\.2_s2v_14b",), WAN_RADIAL, 720, files=(r"wav2vec2",),
                              nodes=frozenset({"AudioEncoderLoader", "LoadAudio", "LoadImage", "WanSoundImageToVideo",
                                               "WanSoundImageToVideoExtend"})),
    "Wan 2.1 VACE 14B": Family((r"wan2\.1_vace_14b",), WAN_RADIAL, 720,
                               nodes=frozenset({"LoadImage", "WanVaceToVideo", "TrimVideoLatent"})),
    "HunyuanVideo T2V": Family((r"hunyuan_video_t2v",), HUNYUAN_RADIAL, 720, files=(r"llava_llama3",),
                               nodes=frozenset({"DualCLIPLoader"}), svg2=HUNYUAN_SVG2, svg=HUNYUAN_SVG),
    # No paper has settings for 1.5: HunyuanVideo's, as its 720p video is the same token grid (31 x 45 x 80 tokens,
    # HunyuanVideo 33 x 45 x 80), head size and text in self-attention. Its 1080p super-resolution model is optional.
    "HunyuanVideo 1.5 T2V 720p": Family((r"hunyuanvideo1\.5_720p_t2v",), HUNYUAN_RADIAL, 720,
                                        files=(r"qwen_2\.5_vl_7b", r"byt5_small_glyphxl"),
                                        nodes=frozenset({"EmptyHunyuanVideo15Latent"}), svg2=HUNYUAN_SVG2,
                                        svg=HUNYUAN_SVG),
    "HunyuanVideo 1.5 I2V 720p": Family((r"hunyuanvideo1\.5_720p_i2v",), HUNYUAN_RADIAL, 720,
                                        files=(r"qwen_2\.5_vl_7b", r"byt5_small_glyphxl", r"sigclip_vision"),
                                        nodes=frozenset({"CLIPVisionEncode", "LoadImage",
                                                         "HunyuanVideo15ImageToVideo"}),
                                        svg2=HUNYUAN_SVG2, svg=HUNYUAN_SVG),
    # No paper has settings for Kandinsky 5: Wan's for every method, as its attention is laid out as Wan's is
    # (self-attention over the video alone, the text by cross-attention) and its Lite model (2B) sits between Wan's
    # 1.3B and 14B.
    "Kandinsky 5 Video Lite T2V": Family((r"kandinsky5lite_t2v",), WAN_RADIAL, 512,
                                         files=(r"qwen_2\.5_vl_7b", r"clip_l", r"hunyuan_video_vae"),
                                         nodes=frozenset({"DualCLIPLoader", "Kandinsky5ImageToVideo"}),
                                         svg2=WAN_SVG2, svg=WAN_SVG),
    # LTX-2 loads its diffusion model from a checkpoint (with its video and audio VAEs). No paper has settings for it:
    # Wan's, as its video's attention is laid out as Wan's is (self-attention over the video alone, the text by
    # cross-attention); 1280 x 704 is its 720p (the VAE's 32-pixel tokens).
    "LTX-2 19B T2V": Family((r"ltx-2-19b-dev",), WAN_RADIAL, 704, files=(r"gemma_3_12b",),
                            nodes=frozenset({"LTXAVTextEncoderLoader", "LTXVAudioVAELoader", "LTXVEmptyLatentAudio",
                                             "LTXVConcatAVLatent", "LTXVSeparateAVLatent", "LTXVAudioVAEDecode"}),
                            svg2=WAN_SVG2, svg=WAN_SVG),
}


def nodes_of(wf, type_name=None):
    return [n for n in wf["nodes"] if type_name is None or n["type"] == type_name]


def node(wf, nid):
    return next(n for n in wf["nodes"] if n["id"] == nid)


def upstream(wf, n, input_name):
    """The node feeding input ``input_name`` of node ``n`` (None when unconnected)."""
    lid = next((i["link"] for i in n.get("inputs", []) if i["name"] == input_name), None)
    if lid is None:
        return None
    link = next(link for link in wf["links"] if link[0] == lid)
    return node(wf, link[1])


def downstream_ids(wf, n) -> set:
    """Ids of every node reached from node ``n``'s outputs."""
    seen, todo = set(), [n["id"]]
    while todo:
        cur = todo.pop()
        for link in wf["links"]:
            if link[1] == cur and link[3] not in seen:
                seen.add(link[3])
                todo.append(link[3])
    return seen


def active(n) -> bool:
    return n.get("mode", 0) == 0


def active_samplers(wf):
    return [n for n in wf["nodes"] if n["type"] in SAMPLER_MODEL_INPUTS and active(n)]


def model_path(wf, sampler):
    """(the nodes between the sampler's model input and the loader, nearest first; the loader or None)."""
    seen, cur = [], upstream(wf, sampler, "model")
    while cur is not None and cur["type"] not in LOADERS:
        seen.append(cur)
        cur = upstream(wf, cur, "model")
    return seen, cur


def is_sparse(path_nodes) -> bool:
    return any(n["type"] == "SparseAttentionPatch" and active(n) for n in path_nodes)


def is_comparison(path) -> bool:
    return COMPARISON_MARK in path.name


def unet_files(wf) -> list[str]:
    """The diffusion model files: UNETLoader's unet_name, or a checkpoint's (LTX-2's, with its VAEs)."""
    return [n["widgets_values"][0] for n in wf["nodes"]  # widget 0: unet_name / ckpt_name
            if n["type"] in ("UNETLoader", "CheckpointLoaderSimple") and active(n)]


def model_files(wf) -> list[str]:
    """Every model file name a loader of the workflow names (any widget value with a model-file extension)."""
    loaders = {t for t, _ in wc.MODEL_FILE_INPUTS if t != "LoadImage"}
    return [v for n in wf["nodes"] if n["type"] in loaders for v in n.get("widgets_values", [])
            if isinstance(v, str) and v.lower().endswith(wc.MODEL_FILE_EXTENSIONS)]


def lora_files(wf) -> list[str]:
    return [n["widgets_values"][0] for n in wf["nodes"] if n["type"] in LORA_LOADERS and active(n)]  # lora_name


def one_file_per_pattern(patterns, files) -> bool:
    per_pattern = [[f for f in files if re.search(p, f, re.IGNORECASE)] for p in patterns]
    covered = {f for hits in per_pattern for f in hits}
    return all(len(hits) == 1 for hits in per_pattern) and covered == set(files) and len(files) == len(patterns)


def families_of(wf) -> list[str]:
    """The families whose diffusion-model patterns the workflow's UNETLoaders match, one file each, and nothing else,
    and whose LoRA patterns its LoRA loaders match the same way."""
    unets, loras = unet_files(wf), lora_files(wf)
    return [name for name, fam in FAMILIES.items()
            if one_file_per_pattern(fam.unets, unets) and one_file_per_pattern(fam.loras, loras)]


def widget(catalog, n, input_name):
    slots = catalog.get(n["type"]).widget_slots(n["widgets_values"])
    index = next(i for i, (inp, role) in enumerate(slots) if inp.name == input_name and role == "value")
    return n["widgets_values"][index]


# ---------------------------------------------------------------------------------------------------------------
# Without ComfyUI

def test_shipped_workflows_present():
    missing = [name for name in SHIPPED if not (wc.WORKFLOWS_DIR / name).is_file()]
    assert not missing, f"workflows missing from {wc.WORKFLOWS_DIR}: {missing}"


@pytest.mark.parametrize("path", PARAMS)
def test_workflow_is_ui_format_json(path):
    try:
        wf = wc.load_workflow(path)
    except (ValueError, UnicodeDecodeError) as why:
        pytest.fail(f"{path.name}: not valid JSON: {why}")
    missing = [k for k in ("last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra", "version")
               if k not in wf]
    assert not missing, f"{path.name}: not a ComfyUI UI-format workflow, keys missing: {missing}"
    assert wf["version"] == 0.4, f"{path.name}: version {wf['version']}"


@pytest.mark.parametrize("path", PARAMS)
def test_every_sampler_model_goes_through_sparse_attention(path):
    """Each model a sampler uses comes from a loader through an active Sparse Attention Patch, whose method input is
    connected to a settings node: the workflow actually runs sparse attention. The one exception is the comparison
    workflow (``*_dense_vs_*``): exactly one of its samplers runs the loader's model dense, the others sparse."""
    wf = wc.load_workflow(path)
    problems, dense = [], []
    samplers = active_samplers(wf)
    for n in samplers:
        seen, loader = model_path(wf, n)
        if loader is None:
            problems.append(f"node {n['id']} ({n['type']}) input 'model': no model loader upstream")
        elif not is_sparse(seen):
            dense.append(f"node {n['id']} ({n['type']}) input 'model': comes from node {loader['id']} "
                         f"({loader['type']}) without an active SparseAttentionPatch "
                         f"(path: {[s['type'] for s in seen]})")
    assert samplers, f"{path.name}: no sampler node"
    if is_comparison(path):
        if len(dense) != 1 or len(samplers) < 2:
            problems.append(f"a comparison workflow has exactly one dense sampler and at least one sparse one; "
                            f"here {len(dense)} dense of {len(samplers)}: {dense}")
    else:
        problems += dense
    for p in nodes_of(wf, "SparseAttentionPatch"):
        if upstream(wf, p, "method") is None:
            problems.append(f"node {p['id']} (SparseAttentionPatch) input 'method': not connected (runs Radial "
                            "with defaults; connect a settings node)")
    assert not problems, f"{path.name}:\n" + "\n".join(problems)


@pytest.mark.parametrize("path", PARAMS)
def test_workflow_is_one_supported_model_family(path):
    """Its UNETLoaders name the diffusion model files of exactly one family the pack supports (by file name)."""
    wf = wc.load_workflow(path)
    found = families_of(wf)
    assert len(found) == 1, (f"{path.name}: diffusion models {unet_files(wf)} match {found or 'no'} family of "
                             f"{list(FAMILIES)}")
    fam = FAMILIES[found[0]]
    files = model_files(wf)
    missing = [p for p in fam.files if not any(re.search(p, f, re.IGNORECASE) for f in files)]
    assert not missing, f"{path.name} ({found[0]}): no model file matching {missing} in {files}"
    types = {n["type"] for n in wf["nodes"]}
    assert fam.nodes <= types, f"{path.name} ({found[0]}): node types {sorted(fam.nodes - types)} missing"


def test_workflows_cover_every_supported_model_and_one_comparison():
    """One sparse workflow per supported model family, and exactly one dense-vs-sparse comparison."""
    covered: dict[str, list[str]] = {name: [] for name in FAMILIES}
    comparisons = []
    for path in FILES:
        if is_comparison(path):
            comparisons.append(path.name)
            continue
        for name in families_of(wc.load_workflow(path)):
            covered[name].append(path.name)
    missing = [name for name, files in covered.items() if not files]
    assert not missing, f"no workflow in {wc.WORKFLOWS_DIR} for {missing} (covered: {covered})"
    assert len(comparisons) == 1, f"expected exactly one comparison workflow (*{COMPARISON_MARK}*), got {comparisons}"


def test_readme_names_every_workflow():
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    missing = [p.name for p in FILES if p.name not in readme]
    assert not missing, f"README.md's workflow table does not name {missing}"


def _dynamic(**options):
    """A dynamic combo as /object_info gives it: option key -> that option's inputs."""
    return [wc.DYNAMIC_COMBO, {"options": [{"key": key, "inputs": inputs} for key, inputs in options.items()]}]


# Shaped like ComfyUI 0.33's SaveVideo (format -> codec -> encoding) and CreateVideo (bit_depth: optional, added after
# the inputs older files store), trimmed.
_ENCODING = _dynamic(auto={}, **{"re-encode": {"required": {"crf": ["FLOAT", {"default": 23.0}]}}})
_CODEC = _dynamic(auto={}, h264={"optional": {"encoding": _ENCODING}})
VIDEO_NODE = wc.node_def_from_info("VideoNode", {"input": {
    "required": {"video": ["VIDEO", {}], "prefix": ["STRING", {"default": "video"}],
                 "format": _dynamic(mp4={"required": {"codec": _CODEC}}, webm={})},
    "optional": {"bit_depth": ["INT", {"default": 8, "min": 8, "max": 10}]}}, "output": ["VIDEO"]})
_H264 = "prefix format format.codec format.codec.encoding"


@pytest.mark.parametrize("values, widgets, loaded", [
    (["v", "mp4", "auto"], "prefix format format.codec bit_depth", ["v", "mp4", "auto", 8]),
    (["v", "mp4", "h264"], f"{_H264} bit_depth", ["v", "mp4", "h264", "auto", 8]),
    (["v", "mp4", "h264", "re-encode", 18.0, 10], f"{_H264} format.codec.encoding.crf bit_depth",
     ["v", "mp4", "h264", "re-encode", 18.0, 10]),
    (["v", "webm"], "prefix format bit_depth", ["v", "webm", 8]),
    # a required widget left out: a truncated or shifted list, not a file older than an input
    (["v", "mp4"], "prefix format format.codec bit_depth", None),
    (["v", "mp4", "h264", "re-encode"], f"{_H264} format.codec.encoding.crf bit_depth", None),
    (["v", "mkv", "auto"], "prefix format bit_depth", ["v", "mkv", "auto"]),  # no such option: no widgets of its own
], ids=["codec-auto", "encoding-default", "all-set", "option-without-inputs", "codec-missing", "crf-missing",
        "unknown-option"])
def test_dynamic_combo_widgets_as_the_frontend_loads_them(values, widgets, loaded):
    """A dynamic combo's value is followed by the widgets of the option it selects, recursively, named
    "combo.input"; trailing optional widgets with a default may be left out (the frontend gives them that default),
    nothing else may."""
    slots = VIDEO_NODE.widget_slots(values)
    assert " ".join(inp.name for inp, _ in slots) == widgets
    assert wc.loaded_values(slots, values) == loaded


# ---------------------------------------------------------------------------------------------------------------
# Against ComfyUI's node definitions

@comfyui
@pytest.mark.parametrize("path", PARAMS)
def test_workflow_matches_node_definitions(path, catalog):
    errors = wc.check_workflow(wc.load_workflow(path), path.name, catalog)
    assert not errors, "\n".join(errors)


@comfyui
@pytest.mark.parametrize("path", PARAMS)
def test_workflow_passes_comfyui_prompt_validation(path, catalog):
    wf = wc.load_workflow(path)
    assert not wc.check_workflow(wf, path.name, catalog), "the file check fails first"
    errors = wc.comfyui_validation_errors(wf, path.name, catalog)
    assert not errors, "\n".join(errors)


@comfyui
@pytest.mark.parametrize("path", PARAMS)
def test_pack_nodes_run_with_the_workflow_settings(path, catalog):
    """The pack's nodes of the workflow, called with its values as ComfyUI would (settings nodes first, then the
    patch on a tiny Wan model), build their settings without error: the values are valid for the code too."""
    import comfy_env

    prompt = wc.to_api_prompt(wc.load_workflow(path), catalog)
    outputs, patched = {}, 0
    model = comfy_env.tiny_wan_t2v()
    for nid, item in sorted(prompt.items(), key=lambda kv: kv[1]["class_type"] not in SETTINGS_NODES):
        cls = wc._loaded["pack_classes"].get(item["class_type"])
        if cls is None:
            continue
        kwargs = {}
        for name, value in item["inputs"].items():
            if isinstance(value, list):  # a link [node id, slot]
                src = prompt[value[0]]["class_type"]
                kwargs[name] = model if src not in wc._loaded["pack_classes"] else outputs[value[0]][value[1]]
            else:
                kwargs[name] = value
        try:
            outputs[nid] = getattr(cls(), cls.FUNCTION)(**kwargs)
        except Exception as why:
            pytest.fail(f"{path.name}: node {nid} ({item['class_type']}) fails with the workflow's values {kwargs}: "
                        f"{type(why).__name__}: {why}")
        patched += item["class_type"] == "SparseAttentionPatch"
    assert patched, f"{path.name}: no SparseAttentionPatch ran"


@comfyui
@pytest.mark.parametrize("path", PARAMS)
def test_notes_name_every_model_file_and_folder(path, catalog):
    """Each model file a loader uses is named in a Note / MarkdownNote with its models/ folder, and the loader's
    ``properties.models`` (the frontend's download offer) gives the same name and folder."""
    wf = wc.load_workflow(path)
    notes = "\n".join(str(v) for n in wf["nodes"] if n["type"] in ("Note", "MarkdownNote")
                      for v in n.get("widgets_values", []))
    problems, files = [], 0
    for n in wf["nodes"]:
        d = catalog.get(n["type"])
        if d is None:
            continue
        offered = {m.get("name"): m.get("directory") for m in n.get("properties", {}).get("models", [])}
        values = n.get("widgets_values", [])
        for (inp, role), value in zip(d.widget_slots(values), values):
            folder = wc.MODEL_FILE_INPUTS.get((n["type"], inp.name))
            if role != "value" or folder is None or folder == "input":
                continue
            files += 1
            where = f"node {n['id']} ({n['type']}) input '{inp.name}'"
            if value not in notes:
                problems.append(f"{where}: the notes do not name {value!r}")
            if f"models/{folder}" not in notes:
                problems.append(f"{where}: the notes do not name the folder models/{folder}")
            if offered.get(value) != folder:
                problems.append(f"{where}: properties.models offers {offered}, expected {value!r} in {folder!r}")
    assert files, f"{path.name}: no model loader"
    assert not problems, f"{path.name}:\n" + "\n".join(problems)


@comfyui
@pytest.mark.parametrize("path", PARAMS)
def test_reference_settings_and_video_size_of_the_family(path, catalog):
    """Every method settings node has the reference settings of the workflow's family (Radial Mask, Wan: decay 0.2,
    sink on; HunyuanVideo: decay 0.95, sink off. SVG2: the family's 720p preset. SVG Settings, Wan: sparsity 0.3,
    sink on, and on its patch dense_steps 0.2, dense_layers 1; HunyuanVideo: 0.25, sink off, 0.1, 1. AdaSpa Search:
    the paper's defaults) and the video has the family's height (the resolution README's table gives). A
    step-distilled family's samplers run the steps and cfg its LoRA was distilled for (lightx2v's: 4 steps, cfg 1)."""
    wf = wc.load_workflow(path)
    found = families_of(wf)
    assert len(found) == 1, f"{path.name}: not one family: {found}"
    fam = FAMILIES[found[0]]
    problems = []
    settings = [n for n in wf["nodes"] if n["type"] in SETTINGS_NODES and active(n)]
    if not settings:
        problems.append(f"no active method settings node ({', '.join(SETTINGS_NODES)})")
    references = {"RadialAttentionMask": fam.radial, "SVG2KMeansSettings": fam.svg2, "AdaSpaSearch": ADASPA_PAPER,
                  "SVGSettings": fam.svg["SVGSettings"] if fam.svg else {}}
    expected_by_node = []
    for n in settings:
        if not references[n["type"]]:
            problems.append(f"node {n['id']} ({n['type']}): no reference settings of it for {found[0]}")
        expected_by_node.append((n, references[n["type"]]))
        if n["type"] == "SVGSettings" and fam.svg:
            patches = [p for p in nodes_of(wf, "SparseAttentionPatch") if upstream(wf, p, "method") is n]
            expected_by_node += [(p, fam.svg["SparseAttentionPatch"]) for p in patches]
    for n, expected_values in expected_by_node:
        for name, expected in expected_values.items():
            if widget(catalog, n, name) != expected:
                problems.append(f"node {n['id']} ({n['type']}) input '{name}': "
                                f"{widget(catalog, n, name)!r}, the {found[0]} reference is {expected!r}")
    sizes = [n for n in wf["nodes"] if n["type"] in LATENT_SIZE_NODES and active(n)]
    if not sizes:
        problems.append(f"no node setting the video size ({sorted(LATENT_SIZE_NODES)})")
    for n in sizes:
        if widget(catalog, n, "height") != fam.height:
            problems.append(f"node {n['id']} ({n['type']}) input 'height': {widget(catalog, n, 'height')}, "
                            f"expected {fam.height} for {found[0]}")
    for n in active_samplers(wf) if fam.distilled else ():
        for name in ("steps", "cfg"):
            if widget(catalog, n, name) != getattr(fam.distilled, name):
                problems.append(f"node {n['id']} ({n['type']}) input '{name}': {widget(catalog, n, name)!r}, its "
                                f"LoRA is distilled for {getattr(fam.distilled, name)!r}")
    assert not problems, f"{path.name} ({found[0]}):\n" + "\n".join(problems)


def sampler_steps(catalog, sampler) -> range:
    """The steps of the run a KSampler / KSamplerAdvanced samples: ComfyUI cuts the run's sigmas at start_at_step and
    end_at_step, and the patch's schedule counts the steps of what is left (the sigmas the sampler gets)."""
    steps = widget(catalog, sampler, "steps")
    if sampler["type"] == "KSampler":
        return range(steps)
    return range(widget(catalog, sampler, "start_at_step"), min(widget(catalog, sampler, "end_at_step"), steps))


DISTILLED = [p for p in PARAMS if any(FAMILIES[f].distilled for f in families_of(wc.load_workflow(p.values[0])))]


@comfyui
@pytest.mark.parametrize("path", DISTILLED)
def test_step_distilled_run_keeps_the_promised_steps_dense(path, catalog):
    """Each sampler's patch, its schedule (core.SparseSchedule) over the steps that sampler runs, keeps dense exactly
    the steps of the run its family promises (lightx2v's 4 steps: step 0), and the samplers cover the run once."""
    sparse_schedule = import_pack("core").SparseSchedule
    wf = wc.load_workflow(path)
    distilled = FAMILIES[families_of(wf)[0]].distilled
    run, dense = [], set()
    for n in active_samplers(wf):
        patch = next(p for p in model_path(wf, n)[0] if p["type"] == "SparseAttentionPatch")
        schedule = sparse_schedule(**{name: widget(catalog, patch, name)
                                      for name in ("dense_steps", "sparse_end", "dense_layers")})
        steps = sampler_steps(catalog, n)
        sparse = schedule.sparse_step_range(len(steps))
        dense |= {step for i, step in enumerate(steps) if i not in sparse}
        run += steps
    assert sorted(run) == list(range(distilled.steps)), f"{path.name}: the samplers run steps {run}"
    assert dense == set(distilled.dense_steps), (f"{path.name}: steps {sorted(dense)} of the run are dense, the family "
                                                 f"promises {list(distilled.dense_steps)}")


@comfyui
def test_comparison_renders_dense_and_sparse_from_the_same_inputs(catalog):
    """The comparison workflow's two samplers differ only by the Sparse Attention Patch: same loader and model
    chain, same prompt and latent nodes, same widget values (seed included) with the seed control 'fixed'; their
    decoded videos are joined (dense on the left) into one saved video."""
    path = next(p for p in FILES if is_comparison(p))
    wf = wc.load_workflow(path)
    samplers = active_samplers(wf)
    assert len(samplers) == 2, f"{path.name}: {len(samplers)} samplers, expected 2 (dense and sparse)"
    paths = {n["id"]: model_path(wf, n) for n in samplers}
    dense = [n for n in samplers if not is_sparse(paths[n["id"]][0])]
    sparse = [n for n in samplers if is_sparse(paths[n["id"]][0])]
    assert len(dense) == 1 and len(sparse) == 1, f"{path.name}: not one dense and one sparse sampler"
    d, sp = dense[0], sparse[0]
    (d_chain, d_loader), (s_chain, s_loader) = paths[d["id"]], paths[sp["id"]]
    problems = []
    if d_loader is None or s_loader is None or d_loader["id"] != s_loader["id"]:
        problems.append(f"the samplers' models come from different loaders ({d_loader and d_loader['id']}, "
                        f"{s_loader and s_loader['id']})")
    if [n["id"] for n in d_chain] != [n["id"] for n in s_chain if n["type"] != "SparseAttentionPatch"]:
        problems.append(f"the model chains differ apart from the patch: dense {[n['type'] for n in d_chain]}, "
                        f"sparse {[n['type'] for n in s_chain]}")
    if d["type"] != sp["type"]:
        problems.append(f"different sampler types: {d['type']} / {sp['type']}")
    for inp in d.get("inputs", []):
        if inp["name"] == "model":
            continue
        a, b = upstream(wf, d, inp["name"]), upstream(wf, sp, inp["name"])
        if (a and a["id"]) != (b and b["id"]):
            problems.append(f"input '{inp['name']}': dense from node {a and a['id']}, sparse from node {b and b['id']}")
    if d["widgets_values"] != sp["widgets_values"]:
        problems.append(f"sampler settings differ: dense {d['widgets_values']}, sparse {sp['widgets_values']}")
    for n in (d, sp):
        for (inp, role), value in zip(catalog.get(n["type"]).widget_slots(n["widgets_values"]), n["widgets_values"]):
            if role == "control" and value != "fixed":
                problems.append(f"node {n['id']} ({n['type']}) input '{inp.name}': control_after_generate "
                                f"{value!r}, expected 'fixed' (the two renders must keep the same seed)")
    shared = downstream_ids(wf, d) & downstream_ids(wf, sp)
    joins = [node(wf, i) for i in shared if node(wf, i)["type"] in JOIN_NODES]
    saves = [node(wf, i) for i in shared if node(wf, i)["type"] in VIDEO_OUTPUTS]
    if not joins or not saves:
        problems.append(f"the two renders are not joined ({sorted(JOIN_NODES)}) into one saved video "
                        f"({sorted(VIDEO_OUTPUTS)}): shared downstream nodes {[node(wf, i)['type'] for i in shared]}")
    for j in joins:
        if j["type"] == "ImageStitch":
            first = upstream(wf, j, "image1")
            if first is None or first["id"] not in downstream_ids(wf, d) or first["id"] in downstream_ids(wf, sp):
                problems.append(f"node {j['id']} (ImageStitch) input 'image1' is not the dense render")
            if widget(catalog, j, "direction") != "right":
                problems.append(f"node {j['id']} (ImageStitch) input 'direction': dense must stay on the left")
    assert not problems, f"{path.name}:\n" + "\n".join(problems)


@comfyui
def test_comfyui_template_browser_lists_and_serves_every_workflow(catalog, tmp_path, monkeypatch, caplog):
    """ComfyUI (app/custom_node_manager.py) serves a pack's example workflows from a folder named one of
    example_workflows / example / examples / workflow / workflows. With the pack in a custom_nodes folder (a
    symlink to this repository), its routes, registered as server.py does, list every JSON of workflows/ under the
    pack's folder name and serve each file where the frontend fetches it. "workflows" is accepted: ComfyUI only logs,
    at DEBUG level, that "example_workflows" is the preferred name, so nothing shows at its default INFO level."""
    import folder_paths
    import nodes as comfy_nodes
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer
    from app.custom_node_manager import CustomNodeManager

    custom = tmp_path / "custom_nodes"
    custom.mkdir()
    pack_dir = custom / "comfyui-sparse-video-attention"
    pack_dir.symlink_to(REPO_ROOT, target_is_directory=True)
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "custom_nodes", ([str(custom)], set()))
    module_name = comfy_nodes.get_module_name(str(pack_dir))  # what nodes.load_custom_node records ...
    loaded = [(module_name, os.path.abspath(pack_dir))]         # ... in LOADED_MODULE_DIRS

    app, routes = web.Application(), web.RouteTableDef()
    with caplog.at_level(logging.DEBUG):
        CustomNodeManager().add_routes(routes, app, loaded)
    api_routes = web.RouteTableDef()  # server.py: every non-static route is also served under /api
    for route in routes:
        if isinstance(route, web.RouteDef):
            api_routes.route(route.method, "/api" + route.path)(route.handler, **route.kwargs)
    app.add_routes(api_routes)
    app.add_routes(routes)

    async def fetch_all():
        async with TestClient(TestServer(app)) as client:
            resp = await client.get("/api/workflow_templates")  # the frontend's api.getWorkflowTemplates()
            assert resp.status == 200, await resp.text()
            listing = await resp.json()
            served = {}
            for name in listing.get(module_name, []):  # the frontend's fetchTemplateJson(name, module)
                r = await client.get(f"/api/workflow_templates/{module_name}/{name}.json")
                served[name] = (r.status, await r.text())
            return listing, served

    listing, served = asyncio.run(fetch_all())
    expected = sorted(p.stem for p in FILES)
    assert sorted(listing.get(module_name, [])) == expected, f"ComfyUI lists {listing}, expected {expected}"
    for p in FILES:
        status, text = served[p.stem]
        assert status == 200, f"{p.name}: served with status {status}"
        assert json.loads(text) == wc.load_workflow(p), f"{p.name}: ComfyUI serves other content"

    ours = [r for r in caplog.records if module_name in r.getMessage()]
    loud = [f"{r.levelname}: {r.getMessage()}" for r in ours if r.levelno >= logging.INFO]
    assert not loud, f"ComfyUI logs about the pack's workflow folder at INFO or above (at every start): {loud}"


# ---------------------------------------------------------------------------------------------------------------
# The check itself: broken copies of a shipped workflow fail, naming the file, the node and the input

def _first(wf, type_name):
    return nodes_of(wf, type_name)[0]


def _set_widget(catalog, wf, type_name, input_name, value):
    n = _first(wf, type_name)
    slots = catalog.get(type_name).widget_slots(n["widgets_values"])
    index = next(i for i, (inp, role) in enumerate(slots) if inp.name == input_name and role == "value")
    n["widgets_values"][index] = value
    return n


def rename_type(catalog, wf):
    n = _first(wf, "SparseAttentionPatch")
    n["type"] = "SparseAttentionPatchh"
    return n, None, ["unknown node type 'SparseAttentionPatchh'"]


def cfg_above_max(catalog, wf):
    return _set_widget(catalog, wf, "KSampler", "cfg", 1000.0), "cfg", ["1000.0", "above the maximum 100"]


def decay_below_min(catalog, wf):
    return (_set_widget(catalog, wf, "RadialAttentionMask", "decay_factor", 0.0), "decay_factor",
            ["below the minimum 0.01"])


def dense_layers_not_int(catalog, wf):
    return _set_widget(catalog, wf, "SparseAttentionPatch", "dense_layers", 1.5), "dense_layers", ["not an INT"]


def backend_not_an_option(catalog, wf):
    return _set_widget(catalog, wf, "SparseAttentionPatch", "backend", "cuda"), "backend", ["'cuda'", "not one of"]


def block_size_as_string(catalog, wf):
    return (_set_widget(catalog, wf, "RadialAttentionMask", "block_size", "128"), "block_size",
            ["'128'", "not one of"])


def sink_not_bool(catalog, wf):
    return (_set_widget(catalog, wf, "RadialAttentionMask", "attention_sink", "yes"), "attention_sink",
            ["not a BOOLEAN"])


def sampler_not_an_option(catalog, wf):
    return (_set_widget(catalog, wf, "KSampler", "sampler_name", "euler_fast"), "sampler_name",
            ["'euler_fast'", "not one of"])


def control_value_dropped(catalog, wf):
    n = _first(wf, "KSampler")
    del n["widgets_values"][1]  # the 'randomize' after the seed
    return n, None, ["widgets_values for 7 widgets", "seed:control"]


def positive_disconnected(catalog, wf):
    n = _first(wf, "KSampler")
    inp = next(i for i in n["inputs"] if i["name"] == "positive")
    lid, inp["link"] = inp["link"], None
    wf["links"] = [link for link in wf["links"] if link[0] != lid]
    for other in wf["nodes"]:
        for out in other.get("outputs", []):
            if out.get("links") and lid in out["links"]:
                out["links"].remove(lid)
    return n, "positive", ["required input (CONDITIONING) is not connected"]


def method_fed_a_model(catalog, wf):
    """Move the Radial Mask -> patch link to start at the loader's MODEL output instead."""
    patch = _first(wf, "SparseAttentionPatch")
    loader = _first(wf, "UNETLoader")
    inp = next(i for i in patch["inputs"] if i["name"] == "method")
    link = next(link for link in wf["links"] if link[0] == inp["link"])
    old = node(wf, link[1])
    old["outputs"][link[2]]["links"].remove(link[0])
    link[1], link[2], link[5] = loader["id"], 0, "MODEL"
    loader["outputs"][0]["links"].append(link[0])
    return patch, "method", ["output type 'MODEL' does not fit input type 'SPARSE_ATTENTION_METHOD'"]


def link_missing_on_output(catalog, wf):
    loader = _first(wf, "VAELoader")
    lid = loader["outputs"][0]["links"].pop()
    dst = node(wf, next(link for link in wf["links"] if link[0] == lid)[3])
    return dst, None, [f"link {lid} from node {loader['id']} (VAELoader)", "do not list it"]


def video_format_not_an_option(catalog, wf):
    return _set_widget(catalog, wf, "SaveVideo", "format", "mov"), "format", ["'mov'", "not one of"]


def video_codec_dropped(catalog, wf):
    """SaveVideo without its codec (a dynamic combo's nested widget in ComfyUI 0.33): not a trailing default."""
    n = _first(wf, "SaveVideo")
    del n["widgets_values"][2]
    return n, None, ["2 widgets_values", "codec"]


def video_values_shifted(catalog, wf):
    n = _first(wf, "SaveVideo")
    n["widgets_values"].insert(0, n["widgets_values"].pop(1))  # the format key first, the file prefix in its place
    return n, "format", ["'video/ComfyUI'", "not one of"]


MUTATIONS = [rename_type, cfg_above_max, decay_below_min, dense_layers_not_int, backend_not_an_option,
             block_size_as_string, sink_not_bool, sampler_not_an_option, control_value_dropped, positive_disconnected,
             method_fed_a_model, link_missing_on_output, video_format_not_an_option, video_codec_dropped,
             video_values_shifted]


@comfyui
def test_save_video_with_a_codec_chosen_passes(catalog):
    """SaveVideo as a ComfyUI 0.3.x frontend saves it with a container and codec chosen (prefix, format, codec): in
    ComfyUI 0.33 format is a dynamic combo, mp4 brings the codec widget, h264 an optional encoding widget the file
    leaves to its default. Both layers accept it, whichever ComfyUI."""
    wf = copy.deepcopy(wc.load_workflow(wc.WORKFLOWS_DIR / MUTATION_SOURCE))
    _first(wf, "SaveVideo")["widgets_values"] = ["video/ComfyUI", "mp4", "h264"]
    assert not wc.check_workflow(wf, MUTATION_SOURCE, catalog)
    assert not wc.comfyui_validation_errors(wf, MUTATION_SOURCE, catalog)


@comfyui
@pytest.mark.parametrize("mutate", MUTATIONS, ids=[m.__name__ for m in MUTATIONS])
def test_broken_copy_fails_naming_file_node_and_input(mutate, catalog, tmp_path):
    source = wc.WORKFLOWS_DIR / MUTATION_SOURCE
    wf = copy.deepcopy(wc.load_workflow(source))
    assert not wc.check_workflow(wf, source.name, catalog), "the shipped workflow must pass before it is broken"
    n, input_name, fragments = mutate(catalog, wf)
    broken = tmp_path / f"broken_{mutate.__name__}.json"
    broken.write_text(json.dumps(wf, ensure_ascii=False), encoding="utf-8")

    errors = wc.check_workflow(wc.load_workflow(broken), broken.name, catalog)
    assert errors, f"{mutate.__name__}: the broken copy passed"
    report = "\n".join(errors)
    mine = [e for e in errors if e.startswith(broken.name) and f"node {n['id']} ({n['type']})" in e
            and (input_name is None or f"input '{input_name}'" in e)
            and all(f in e for f in fragments)]
    assert mine, (f"no message names {broken.name}, node {n['id']} ({n['type']})"
                  f"{'' if input_name is None else f', input {input_name!r}'} and says {fragments}:\n{report}")


@comfyui
@pytest.mark.parametrize("mutate", [cfg_above_max, decay_below_min, backend_not_an_option, positive_disconnected],
                         ids=lambda m: m.__name__)
def test_comfyui_validation_rejects_broken_values(mutate, catalog):
    """The second layer on its own: ComfyUI's server-side validation of the prompt rejects what the first does."""
    source = wc.WORKFLOWS_DIR / MUTATION_SOURCE
    wf = copy.deepcopy(wc.load_workflow(source))
    n, input_name, _ = mutate(catalog, wf)
    errors = wc.comfyui_validation_errors(wf, source.name, catalog)
    assert any(f"node {n['id']} ({n['type']}) input '{input_name}'" in e for e in errors), "\n".join(errors)
