"""Check ComfyUI workflow files (the UI / litegraph format, version 0.4) against the real node definitions.

Two layers, both against the node classes a ComfyUI server would register (its ``nodes.py``, the ``comfy_extras``
files, and this pack's nodes):

1. :func:`check_workflow` reads the file as the ComfyUI frontend loads it: every node type exists, every link is
   recorded the same way in the ``links`` array and in both nodes' ``inputs`` / ``outputs``, joins an output to an
   input of a matching type, every required input is linked or has a widget value, and ``widgets_values`` holds one
   accepted value per widget, in the order the frontend creates the widgets from ``INPUT_TYPES`` (a dynamic combo's
   key followed by the widgets of its selected option; trailing optional widgets with a default may be left out,
   the frontend gives them that default).
2. :func:`comfyui_validation_errors` turns the workflow into the API prompt the frontend would queue and runs it
   through ComfyUI's own server-side check (``execution.validate_prompt``). Model-file names are the one thing it may
   reject here (they depend on the local ``models/`` folders), so ``value_not_in_list`` on those inputs is ignored.

Every message names the file, the node id and type, and the input or link.

ComfyUI is found and imported by ``comfy_env.setup()`` (the rule of DESIGN.md); :func:`load_catalog` raises
:class:`ComfyUIUnavailable` with the reason when it is not there.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import inspect
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import comfy_env
from pack import REPO_ROOT, import_pack

WORKFLOWS_DIR = REPO_ROOT / "workflows"

# Nodes that exist only in the browser (the frontend's own node types): never sent to the server.
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}

# Combo inputs whose options are the files of a local models folder: their option list depends on the machine, so
# any file name is accepted there (the folder is where the workflow's notes must tell the user to put the file).
MODEL_FILE_INPUTS = {
    ("UNETLoader", "unet_name"): "diffusion_models",
    ("CLIPLoader", "clip_name"): "text_encoders",
    ("DualCLIPLoader", "clip_name1"): "text_encoders",
    ("DualCLIPLoader", "clip_name2"): "text_encoders",
    ("TripleCLIPLoader", "clip_name1"): "text_encoders",
    ("TripleCLIPLoader", "clip_name2"): "text_encoders",
    ("TripleCLIPLoader", "clip_name3"): "text_encoders",
    ("QuadrupleCLIPLoader", "clip_name1"): "text_encoders",
    ("QuadrupleCLIPLoader", "clip_name2"): "text_encoders",
    ("QuadrupleCLIPLoader", "clip_name3"): "text_encoders",
    ("QuadrupleCLIPLoader", "clip_name4"): "text_encoders",
    ("VAELoader", "vae_name"): "vae",
    ("CheckpointLoaderSimple", "ckpt_name"): "checkpoints",
    ("LTXAVTextEncoderLoader", "text_encoder"): "text_encoders",
    ("LTXAVTextEncoderLoader", "ckpt_name"): "checkpoints",
    ("LTXVAudioVAELoader", "ckpt_name"): "checkpoints",
    ("ImageOnlyCheckpointLoader", "ckpt_name"): "checkpoints",
    ("LoraLoader", "lora_name"): "loras",
    ("LoraLoaderModelOnly", "lora_name"): "loras",
    ("CLIPVisionLoader", "clip_name"): "clip_vision",
    ("ControlNetLoader", "control_net_name"): "controlnet",
    ("UpscaleModelLoader", "model_name"): "upscale_models",
    ("LatentUpscaleModelLoader", "model_name"): "latent_upscale_models",
    ("AudioEncoderLoader", "audio_encoder_name"): "audio_encoders",
    ("LoadImage", "image"): "input",
    ("LoadAudio", "audio"): "input",
    ("LoadVideo", "file"): "input",
}
MODEL_FILE_EXTENSIONS = (".safetensors", ".sft", ".ckpt", ".pt", ".pt2", ".pth", ".bin", ".gguf")

CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
# A combo whose every option brings its own inputs (ComfyUI's comfy_api io.DynamicCombo, e.g. SaveVideo's format).
DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO", DYNAMIC_COMBO)
UPLOAD_OPTIONS = ("image_upload", "animated_image_upload", "video_upload")


class ComfyUIUnavailable(RuntimeError):
    """No usable ComfyUI here (the reason is the message)."""


# ---------------------------------------------------------------------------------------------------------------
# Node definitions

@dataclass
class InputDef:
    name: str                      # a dynamic combo's nested input: "combo.input" (the frontend's and server's name)
    type: str                      # socket type, or "COMBO" for a list of options
    options: dict
    required: bool                 # a dynamic combo's nested input: required in its option
    choices: list | None = None    # the combo's options (a dynamic combo's option keys)
    nested: dict | None = None     # a dynamic combo's inputs per option key

    @property
    def widget_type(self) -> str:
        """The type of its widget: its own, or for an input of several types (a V3 MultiType such as LTX-2's
        "FLOAT,INT" frame rates) the one ComfyUI names for its widget (``widgetType``)."""
        return self.type if self.type in WIDGET_TYPES else self.options.get("widgetType", self.type)

    @property
    def widget(self) -> bool:
        """The frontend makes a widget (a value in widgets_values) for it, not a socket."""
        return self.widget_type in WIDGET_TYPES and not self.options.get("forceInput", False)

    @property
    def default(self):
        """The value the frontend gives a new widget: a dynamic combo its first option, a combo its default or first
        option, any other widget its declared default; None without one (the frontend then makes up 0 or "")."""
        if self.type == DYNAMIC_COMBO or (self.type == "COMBO" and not self.options.get("default")):
            return self.choices[0] if self.choices else None
        return self.options.get("default")

    @property
    def control_after_generate(self) -> bool:
        """The frontend adds a 'control_after_generate' widget (fixed / increment / ...) right after it."""
        if not self.widget:
            return False
        if "control_after_generate" in self.options:
            return bool(self.options["control_after_generate"])
        return self.type == "INT" and self.name in ("seed", "noise_seed")  # the frontend's rule for older nodes


@dataclass
class NodeDef:
    type: str
    inputs: list[InputDef]
    outputs: list[str]
    output_names: list[str]
    by_name: dict = field(init=False)

    def __post_init__(self):
        self.by_name = {i.name: i for i in self.inputs}

    def widget_slots(self, values=()) -> list[tuple[InputDef, str]]:
        """(input, role) per widget the frontend makes for a node saved with widgets_values ``values``, in its order;
        role: value / control / filter / player / upload. The frontend assigns the values one by one, and assigning a
        dynamic combo's key inserts the widgets of that option's inputs right after it, which take the next values (so
        recursively); a combo left without a value keeps its default option."""
        slots = []

        def add(inputs):
            for inp in inputs:
                if not inp.widget:
                    continue
                slots.append((inp, "value"))
                if inp.nested is not None:
                    key = values[len(slots) - 1] if len(slots) <= len(values) else inp.default
                    add(inp.nested.get(key, []) if isinstance(key, str) else [])
                if inp.control_after_generate:
                    slots.append((inp, "control"))
                    if inp.type == "COMBO":
                        slots.append((inp, "filter"))
                if inp.options.get("audio_upload"):  # Load Audio: the frontend's audio player, then its upload button
                    slots.extend([(inp, "player"), (inp, "upload")])
                elif any(inp.options.get(key) for key in UPLOAD_OPTIONS):
                    slots.append((inp, "upload"))

        add(self.inputs)
        return slots


def loaded_values(slots: list[tuple[InputDef, str]], values: list) -> list | None:
    """The widget values the frontend holds after loading ``values`` into ``slots``: it assigns the saved values in
    order and leaves the widgets after them at their defaults. That is how a file saved before a node gained an
    optional input loads (CreateVideo's bit_depth, SaveVideo's hidden codec), so those widgets may be left out; any
    other shortfall (a required widget, one without a default, a control widget) is a shifted or truncated list:
    None."""
    rest = slots[len(values):]
    if len(values) > len(slots) or not all(role == "value" and not inp.required and inp.default is not None
                                           for inp, role in rest):
        return None
    return list(values) + [inp.default for inp, _ in rest]


def _inputs(specs: dict, order: dict | None = None, prefix: str = "") -> list[InputDef]:
    """Input definitions from an ``input`` dict ({"required": {...}, "optional": {...}}), in ``order`` (the
    server's ``input_order``) or the dicts' own order."""
    inputs = []
    for category in ("required", "optional"):
        section = specs.get(category) or {}
        for name in (order or {}).get(category) or list(section):
            inputs.append(_input_def(prefix + name, section[name], category == "required"))
    return inputs


def _input_def(name: str, spec, required: bool) -> InputDef:
    spec = tuple(spec) if isinstance(spec, (list, tuple)) else (spec,)
    kind = spec[0]
    options = dict(spec[1]) if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if isinstance(kind, (list, tuple)):
        return InputDef(name, "COMBO", options, required, list(kind))
    if kind == "COMBO":
        return InputDef(name, "COMBO", options, required, list(options.get("options", [])))
    if kind == DYNAMIC_COMBO:
        nested = {o["key"]: _inputs(o.get("inputs") or {}, prefix=name + ".")
                  for o in options.get("options", [])}
        return InputDef(name, DYNAMIC_COMBO, options, required, list(nested), nested)
    return InputDef(name, str(kind), options, required)


def node_def_from_info(type_name: str, info: dict) -> NodeDef:
    """From ComfyUI's /object_info entry of a node (``input``, optional ``input_order``, ``output``...)."""
    inputs = _inputs(info.get("input") or {}, info.get("input_order"))
    outputs = [("COMBO" if isinstance(t, (list, tuple)) else str(t)) for t in info.get("output") or ()]
    names = list(info.get("output_name") or outputs)
    return NodeDef(type_name, inputs, outputs, names)


def node_info(cls) -> dict:
    """What ComfyUI's server sends the frontend for a node class (server.py ``node_info``, trimmed)."""
    if hasattr(cls, "GET_NODE_INFO_V1"):  # a V3 (comfy_api io.ComfyNode) node
        return cls.GET_NODE_INFO_V1()
    return {"input": cls.INPUT_TYPES(), "output": tuple(cls.RETURN_TYPES),
            "output_name": tuple(getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES)}


class Catalog:
    """Node type name -> NodeDef, from node classes (ComfyUI's NODE_CLASS_MAPPINGS plus the pack's)."""

    def __init__(self, classes: dict, failed_extras: list[str] = (), comfyui_path: Path | None = None):
        self.classes = dict(classes)
        self.failed_extras = list(failed_extras)
        self.comfyui_path = comfyui_path
        self._defs: dict[str, NodeDef] = {}

    def __contains__(self, type_name: str) -> bool:
        return type_name in self.classes

    def get(self, type_name: str) -> NodeDef | None:
        if type_name not in self.classes:
            return None
        if type_name not in self._defs:
            self._defs[type_name] = node_def_from_info(type_name, node_info(self.classes[type_name]))
        return self._defs[type_name]


_loaded: dict = {}


def _comfy_utils_package(root: Path) -> None:
    """ComfyUI's ``nodes.py`` puts ``ComfyUI/comfy`` first on sys.path, after which ``import utils`` finds
    ``comfy/utils.py`` and ``server.py`` (imported by comfy_extras/nodes_images.py) fails on
    ``utils.install_util``. ComfyUI's main.py imports the ``utils`` package first; so does this."""
    pkg = root / "utils"
    if not (pkg / "__init__.py").is_file():
        return
    current = sys.modules.get("utils")
    if current is not None:
        where = Path(getattr(current, "__file__", "") or "").resolve()
        if where == (pkg / "__init__.py").resolve() or where != (root / "comfy" / "utils.py").resolve():
            return
    spec = importlib.util.spec_from_file_location("utils", pkg / "__init__.py", submodule_search_locations=[str(pkg)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["utils"] = module
    spec.loader.exec_module(module)


async def _load_extras(comfy_nodes):
    if hasattr(comfy_nodes, "init_builtin_extra_nodes"):
        if hasattr(comfy_nodes, "init_public_apis"):
            await comfy_nodes.init_public_apis()
        failed = comfy_nodes.init_builtin_extra_nodes()
    else:  # older ComfyUI: the all-in-one (it also cleans ComfyUI's temp folder)
        failed = comfy_nodes.init_extra_nodes(init_custom_nodes=False)
    if inspect.isawaitable(failed):
        failed = await failed
    return list(failed or [])


def load_catalog() -> Catalog:
    """ComfyUI's node classes (nodes.py + comfy_extras, loaded once per process) and the pack's. Raises
    ComfyUIUnavailable when ComfyUI is not found or cannot be imported."""
    if "catalog" in _loaded:
        return _loaded["catalog"]
    path, note = comfy_env.setup()
    if path is None:
        raise ComfyUIUnavailable(note)
    try:
        _comfy_utils_package(path)
        comfy_nodes = importlib.import_module("nodes")
        if Path(comfy_nodes.__file__).resolve().parent != path.resolve():
            raise ComfyUIUnavailable(f"`import nodes` gave {comfy_nodes.__file__}, not ComfyUI's nodes.py in {path}")
        failed = asyncio.run(_load_extras(comfy_nodes))
        pack_nodes = import_pack("nodes")
    except ComfyUIUnavailable:
        raise
    except Exception as why:
        raise ComfyUIUnavailable(f"{note}, but loading its nodes failed: {type(why).__name__}: {why}") from why
    classes = dict(comfy_nodes.NODE_CLASS_MAPPINGS)
    classes.update(pack_nodes.NODE_CLASS_MAPPINGS)
    _loaded["pack_classes"] = dict(pack_nodes.NODE_CLASS_MAPPINGS)
    _loaded["catalog"] = Catalog(classes, failed, path)
    return _loaded["catalog"]


# ---------------------------------------------------------------------------------------------------------------
# Checks of the file

def types_match(out_type: str, in_type: str) -> bool:
    """The frontend's rule: equal, either is "*", or the comma-separated unions share a type."""
    if out_type == in_type or "*" in (out_type, in_type):
        return True
    return bool({t.strip() for t in str(out_type).split(",")} & {t.strip() for t in str(in_type).split(",")})


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _value_problem(node_type: str, inp: InputDef, role: str, value):
    """Why a widget value is not accepted, or None."""
    if role == "control":
        return None if value in CONTROL_VALUES else f"control_after_generate value {value!r} is not one of {CONTROL_VALUES}"
    if role in ("filter", "player", "upload"):
        return None
    kind, opts = inp.widget_type, inp.options
    if kind in ("COMBO", DYNAMIC_COMBO):
        folder = MODEL_FILE_INPUTS.get((node_type, inp.name))
        if folder is not None:
            if not isinstance(value, str) or not value:
                return f"model file name must be a non-empty string, got {value!r}"
            if folder != "input" and not value.lower().endswith(MODEL_FILE_EXTENSIONS):
                return f"model file {value!r} has none of the extensions {MODEL_FILE_EXTENSIONS}"
            return None
        if not any(value == c and type(value) is type(c) for c in inp.choices):
            shown = inp.choices if len(inp.choices) <= 20 else f"{inp.choices[:20]}... ({len(inp.choices)} options)"
            if not inp.choices:
                return (f"value {value!r}: this combo has no options here (a list of local files? then add "
                        f"({node_type!r}, {inp.name!r}) to MODEL_FILE_INPUTS)")
            return f"value {value!r} is not one of the options {shown}"
        return None
    if kind == "INT" and not _is_int(value):
        return f"value {value!r} is not an INT"
    if kind == "FLOAT" and not _is_number(value):
        return f"value {value!r} is not a FLOAT"
    if kind == "BOOLEAN":
        return None if isinstance(value, bool) else f"value {value!r} is not a BOOLEAN (true / false)"
    if kind == "STRING":
        return None if isinstance(value, str) else f"value {value!r} is not a STRING"
    if "min" in opts and value < opts["min"]:
        return f"value {value!r} is below the minimum {opts['min']}"
    if "max" in opts and value > opts["max"]:
        return f"value {value!r} is above the maximum {opts['max']}"
    return None


def check_workflow(workflow: dict, label: str, catalog: Catalog) -> list[str]:
    """Problems of a UI-format workflow (empty when it is good). ``label`` (the file name) starts every message."""
    errors: list[str] = []
    err = errors.append

    for key in ("last_node_id", "last_link_id", "nodes", "links", "version"):
        if key not in workflow:
            err(f"{label}: no {key!r} key (not a ComfyUI UI-format workflow?)")
    if errors:
        return errors
    if workflow.get("version") != 0.4:
        err(f"{label}: version {workflow.get('version')!r}, expected 0.4")

    nodes: dict[int, dict] = {}
    for n in workflow["nodes"]:
        nid = n.get("id")
        if not _is_int(nid):
            err(f"{label}: a node ({n.get('type')!r}) has id {nid!r}, not an integer")
            continue
        if nid in nodes:
            err(f"{label}: node id {nid} is used twice ({nodes[nid].get('type')} and {n.get('type')})")
        nodes[nid] = n
    if nodes and max(nodes) > workflow["last_node_id"]:
        err(f"{label}: last_node_id {workflow['last_node_id']} is below node id {max(nodes)}")

    def where(n) -> str:
        return f"{label}: node {n.get('id')} ({n.get('type')})"

    defs: dict[int, NodeDef | None] = {}
    for nid, n in nodes.items():
        t = n.get("type")
        if t in FRONTEND_ONLY:
            defs[nid] = None
            continue
        d = catalog.get(t)
        defs[nid] = d
        if d is None:
            hint = ""
            if catalog.failed_extras:
                hint = f" (these comfy_extras files failed to import here: {', '.join(catalog.failed_extras)})"
            err(f"{where(n)}: unknown node type {t!r}: not a node of ComfyUI's nodes.py, comfy_extras or this "
                f"pack{hint}")
            continue
        if n.get("mode", 0) not in (0, 2, 4):
            err(f"{where(n)}: mode {n.get('mode')!r} is not 0 (always), 2 (muted) or 4 (bypassed)")
        _check_node(n, d, where(n), err)

    # links: the array, and each end's record of it
    links: dict[int, list] = {}
    for link in workflow["links"]:
        if not isinstance(link, list) or len(link) != 6:
            err(f"{label}: link entry {link!r} is not [id, from_node, from_slot, to_node, to_slot, type]")
            continue
        lid, src, src_slot, dst, dst_slot, ltype = link
        if lid in links:
            err(f"{label}: link id {lid} is used twice")
        links[lid] = link
        if not _is_int(lid) or lid > workflow["last_link_id"]:
            err(f"{label}: link id {lid!r} is not an integer <= last_link_id {workflow['last_link_id']}")
        s, d = nodes.get(src), nodes.get(dst)
        if s is None or d is None:
            err(f"{label}: link {lid} joins node {src} to node {dst}, but node {src if s is None else dst} does not "
                "exist")
            continue
        outs, ins = s.get("outputs") or [], d.get("inputs") or []
        if not (_is_int(src_slot) and 0 <= src_slot < len(outs)):
            err(f"{where(s)}: link {lid} leaves from output slot {src_slot}, but the node has {len(outs)} outputs")
            continue
        if not (_is_int(dst_slot) and 0 <= dst_slot < len(ins)):
            err(f"{where(d)}: link {lid} arrives at input slot {dst_slot}, but the node has {len(ins)} inputs")
            continue
        out, inp = outs[src_slot], ins[dst_slot]
        link_text = (f"link {lid} from node {src} ({s.get('type')}) output '{out.get('name')}' to node {dst} "
                     f"({d.get('type')}) input '{inp.get('name')}'")
        if lid not in (out.get("links") or []):
            err(f"{label}: {link_text}: the output's 'links' {out.get('links')} do not list it")
        if inp.get("link") != lid:
            err(f"{label}: {link_text}: the input records link {inp.get('link')!r}")
        out_type = _output_type(s, src_slot, defs.get(src))
        in_type = _input_type(d, inp, defs.get(dst))
        if ltype != out_type and "*" not in (ltype, out_type):
            err(f"{label}: {link_text}: the link's type {ltype!r} is not the output's type {out_type!r}")
        if not types_match(out_type, in_type):
            err(f"{label}: {link_text}: output type {out_type!r} does not fit input type {in_type!r}")
    if links and all(_is_int(k) for k in links) and max(links) > workflow["last_link_id"]:
        err(f"{label}: last_link_id {workflow['last_link_id']} is below link id {max(links)}")

    # every link a node records must be in the array, pointing back at the same slot
    for nid, n in nodes.items():
        for slot, inp in enumerate(n.get("inputs") or []):
            lid = inp.get("link")
            if lid is None:
                continue
            link = links.get(lid)
            if link is None:
                err(f"{where(n)} input '{inp.get('name')}': link {lid} is not in the workflow's links")
            elif (link[3], link[4]) != (nid, slot):
                err(f"{where(n)} input '{inp.get('name')}': link {lid} goes to node {link[3]} slot {link[4]}, not "
                    f"here (slot {slot})")
        for slot, out in enumerate(n.get("outputs") or []):
            for lid in out.get("links") or []:
                link = links.get(lid)
                if link is None:
                    err(f"{where(n)} output '{out.get('name')}': link {lid} is not in the workflow's links")
                elif (link[1], link[2]) != (nid, slot):
                    err(f"{where(n)} output '{out.get('name')}': link {lid} leaves from node {link[1]} slot "
                        f"{link[2]}, not here (slot {slot})")
    return errors


def _output_type(node: dict, slot: int, d: NodeDef | None) -> str:
    if d is not None and slot < len(d.outputs):
        return d.outputs[slot]
    return (node.get("outputs") or [])[slot].get("type", "*")


def _input_type(node: dict, inp: dict, d: NodeDef | None) -> str:
    if d is not None and inp.get("name") in d.by_name:
        return d.by_name[inp["name"]].type
    return inp.get("type", "*")


def _check_node(n: dict, d: NodeDef, where: str, err) -> None:
    saved_inputs = n.get("inputs") or []
    linked = {}
    for inp in saved_inputs:
        name = inp.get("name")
        spec = d.by_name.get(name)
        if spec is None:
            err(f"{where} input '{name}': {d.type} has no input of that name (its inputs: "
                f"{', '.join(i.name for i in d.inputs)})")
            continue
        if "widget" in inp:
            if not spec.widget:
                err(f"{where} input '{name}': marked as a widget input, but {d.type} makes a socket for it")
        elif spec.widget:
            err(f"{where} input '{name}': {d.type} makes a widget for it, but it is saved as a socket without "
                "a 'widget' entry")
        if inp.get("type") not in (spec.type, "*") and not types_match(inp.get("type", ""), spec.type):
            err(f"{where} input '{name}': saved with type {inp.get('type')!r}, {d.type} declares {spec.type!r}")
        if inp.get("link") is not None:
            linked[name] = inp["link"]
    for spec in d.inputs:
        if spec.required and not spec.widget and spec.name not in linked:
            err(f"{where} input '{spec.name}': required input ({spec.type}) is not connected")

    outs = n.get("outputs") or []
    if len(outs) > len(d.outputs):  # fewer is fine: the frontend adds the rest (a node that gained an output)
        err(f"{where}: {len(outs)} outputs saved, {d.type} has {len(d.outputs)} ({', '.join(d.outputs) or 'none'})")
    for slot, (out, t) in enumerate(zip(outs, d.outputs)):
        if out.get("type") != t:
            err(f"{where} output {slot} '{out.get('name')}': saved with type {out.get('type')!r}, {d.type} returns "
                f"{t!r}")

    values = n.get("widgets_values", [])
    if isinstance(values, dict):  # some custom frontends save widgets by name
        values = [values.get(inp.name) if role == "value" else None for inp, role in d.widget_slots()]
    if not isinstance(values, list):
        err(f"{where}: widgets_values is {type(values).__name__}, not a list")
        return
    slots = d.widget_slots(values)
    if loaded_values(slots, values) is None:
        expected = ", ".join(inp.name if role == "value" else f"{inp.name}:{role}" for inp, role in slots)
        err(f"{where}: {len(values)} widgets_values for {len(slots)} widgets ({expected or 'none'}): {values!r}")
    for (inp, role), value in zip(slots, values):
        problem = _value_problem(d.type, inp, role, value)
        if problem:
            err(f"{where} input '{inp.name}': {problem}")


# ---------------------------------------------------------------------------------------------------------------
# ComfyUI's own validation of the prompt the frontend would queue

def to_api_prompt(workflow: dict, catalog: Catalog) -> dict:
    """The API-format prompt of a (valid) UI workflow, as the frontend's graphToPrompt builds it: muted nodes and
    frontend-only nodes left out, links through bypassed nodes and reroutes followed, every widget's value (defaults
    included) under its name, a dynamic combo's nested ones as "combo.input" (how ComfyUI's comfy_api reads them)."""
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}

    def source(lid, want_type):
        seen = set()
        while lid is not None and lid not in seen:
            seen.add(lid)
            _, src, slot, _, _, _ = links[lid]
            s = nodes[src]
            if s["type"] == "Reroute":
                lid = (s.get("inputs") or [{}])[0].get("link")
                continue
            if s["type"] == "PrimitiveNode":
                return ("value", (s.get("widgets_values") or [None])[0])
            if s.get("mode", 0) == 2:
                return None
            if s.get("mode", 0) == 4:
                lid = next((i.get("link") for i in s.get("inputs") or []
                            if i.get("link") is not None and types_match(i.get("type", "*"), want_type)), None)
                continue
            return ("link", [str(src), slot])
        return None

    prompt = {}
    for nid, n in nodes.items():
        if n["type"] in FRONTEND_ONLY or n.get("mode", 0) in (2, 4):
            continue
        d = catalog.get(n["type"])
        values = n.get("widgets_values") or []
        slots = d.widget_slots(values)
        inputs = {}
        for (inp, role), value in zip(slots, loaded_values(slots, values) or values):
            if role == "value":
                inputs[inp.name] = {"__value__": value} if isinstance(value, list) else value
        for inp in n.get("inputs") or []:
            if inp.get("link") is None:
                continue
            got = source(inp["link"], _input_type(n, inp, d))
            if got is None:
                inputs.pop(inp["name"], None)
            elif got[0] == "value":
                inputs[inp["name"]] = got[1]
            else:
                inputs[inp["name"]] = got[1]
        prompt[str(nid)] = {"class_type": n["type"], "inputs": inputs, "_meta": {"title": n.get("title", n["type"])}}
    return prompt


@contextlib.contextmanager
def _pack_registered():
    """The pack's node classes in ComfyUI's NODE_CLASS_MAPPINGS (as when it is installed), removed afterwards."""
    comfy_nodes = sys.modules["nodes"]
    added = [k for k in _loaded.get("pack_classes", {}) if k not in comfy_nodes.NODE_CLASS_MAPPINGS]
    for k in added:
        comfy_nodes.NODE_CLASS_MAPPINGS[k] = _loaded["pack_classes"][k]
    try:
        yield
    finally:
        for k in added:
            comfy_nodes.NODE_CLASS_MAPPINGS.pop(k, None)


def comfyui_validation_errors(workflow: dict, label: str, catalog: Catalog) -> list[str]:
    """Problems ComfyUI's server-side validation (execution.validate_prompt) finds in the workflow's prompt, apart
    from model files missing from the local folders."""
    import execution

    prompt = to_api_prompt(workflow, catalog)
    logging.disable(logging.ERROR)  # validate_prompt logs every error it returns; they are returned here
    try:
        with _pack_registered():
            valid, error, _good, node_errors = asyncio.run(execution.validate_prompt("workflow-check", prompt, None))
    finally:
        logging.disable(logging.NOTSET)
    problems = []
    for nid, info in node_errors.items():
        class_type = info.get("class_type")
        for e in info.get("errors", []):
            name = (e.get("extra_info") or {}).get("input_name")
            if e.get("type") == "value_not_in_list" and (class_type, name) in MODEL_FILE_INPUTS:
                continue  # a model file not in this machine's models folder
            if e.get("type") == "custom_validation_failed" and MODEL_FILE_INPUTS.get((class_type, name)) == "input":
                continue  # a file of the user's (audio, control video) not in this machine's input folder
            problems.append(f"{label}: node {nid} ({class_type}) input '{name}': ComfyUI's validation: "
                            f"{e.get('message')}: {e.get('details')}")
    if not valid and error and error.get("type") != "prompt_outputs_failed_validation":
        problems.append(f"{label}: ComfyUI's validation: {error.get('message')} {error.get('details')}")
    return problems


def load_workflow(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def workflow_files() -> list[Path]:
    return sorted(WORKFLOWS_DIR.glob("*.json"))


# A workflow for a model only newer ComfyUI runs says so in its extra data: {"sparse_video_attention":
# {"min_comfyui": "0.33.0"}}. Its checks against ComfyUI's nodes are marked newer_comfyui (CI's run on the oldest
# supported ComfyUI deselects them) and skipped, saying why, against an older ComfyUI.
OLDEST_COMFYUI = "0.3.64"


def _version(text: str) -> tuple:
    return tuple(int(part) for part in text.split(".")[:3])


def min_comfyui(workflow: dict) -> str:
    return ((workflow.get("extra") or {}).get("sparse_video_attention") or {}).get("min_comfyui", OLDEST_COMFYUI)


def workflow_params() -> list:
    """One pytest parameter per shipped workflow, marked newer_comfyui where it needs a newer ComfyUI."""
    import pytest
    return [pytest.param(p, id=p.name, marks=[pytest.mark.newer_comfyui] * (
        _version(min_comfyui(load_workflow(p))) > _version(OLDEST_COMFYUI))) for p in workflow_files()]


def too_new_for_this_comfyui(path: Path) -> str | None:
    """Why this ComfyUI cannot run the workflow's nodes (it is older than the workflow needs), else None."""
    import comfyui_version
    need, have = min_comfyui(load_workflow(path)), comfyui_version.__version__
    return f"{path.name} needs ComfyUI {need} or newer, this is {have}" if _version(have) < _version(need) else None
