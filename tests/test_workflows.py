"""The shipped workflows (workflows/*.json, ComfyUI UI format) against the real node definitions.

Every JSON in workflows/ is checked (tests/workflow_check.py says how): node types exist in ComfyUI (nodes.py +
comfy_extras) or this pack, links are consistent and typed, required inputs are linked or set, widget values are in
the order of INPUT_TYPES and accepted (combos, min / max, booleans), and ComfyUI's own server-side validation accepts
the prompt the frontend would queue. Model-file names are free (they depend on the local models folders) but must
be named, with their folder, in the workflow's notes.

Needs ComfyUI (found as DESIGN.md says); without it the ComfyUI tests are skipped loudly (conftest.py). ComfyUI's
node classes are loaded once per session (about 10-15 s, most of it importing ComfyUI).
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest

import workflow_check as wc

comfyui = pytest.mark.comfyui  # skipped, loudly, without ComfyUI (conftest.py)

SHIPPED = ("wan2.1_t2v_radial.json", "wan2.2_a14b_t2v_radial.json", "hunyuanvideo_t2v_radial.json")
FILES = wc.workflow_files()
IDS = [p.name for p in FILES]
SAMPLER_MODEL_INPUTS = {"KSampler", "KSamplerAdvanced", "BasicGuider", "CFGGuider", "DualCFGGuider", "SamplerCustom"}
LOADERS = {"UNETLoader", "CheckpointLoaderSimple", "UnetLoaderGGUF"}


class WorkflowCheckUnavailable(pytest.PytestWarning):
    """ComfyUI was found but its node classes could not be loaded: the workflow checks are skipped."""


@pytest.fixture(scope="module")
def catalog():
    try:
        return wc.load_catalog()
    except wc.ComfyUIUnavailable as why:
        warnings.warn(WorkflowCheckUnavailable(f"workflow checks SKIPPED: {why}"))
        pytest.skip(f"needs ComfyUI's node classes: {why}")


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


# ---------------------------------------------------------------------------------------------------------------
# Without ComfyUI

def test_shipped_workflows_present():
    missing = [name for name in SHIPPED if not (wc.WORKFLOWS_DIR / name).is_file()]
    assert not missing, f"workflows missing from {wc.WORKFLOWS_DIR}: {missing}"


@pytest.mark.parametrize("path", FILES, ids=IDS)
def test_workflow_is_ui_format_json(path):
    try:
        wf = wc.load_workflow(path)
    except (ValueError, UnicodeDecodeError) as why:
        pytest.fail(f"{path.name}: not valid JSON: {why}")
    missing = [k for k in ("last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra", "version")
               if k not in wf]
    assert not missing, f"{path.name}: not a ComfyUI UI-format workflow, keys missing: {missing}"
    assert wf["version"] == 0.4, f"{path.name}: version {wf['version']}"


@pytest.mark.parametrize("path", FILES, ids=IDS)
def test_every_sampler_model_goes_through_sparse_attention(path):
    """Each model a sampler uses comes from a loader through a Sparse Attention Patch, whose method input is
    connected to a settings node: the workflow actually runs sparse attention."""
    wf = wc.load_workflow(path)
    problems, samplers = [], 0
    for n in wf["nodes"]:
        if n["type"] not in SAMPLER_MODEL_INPUTS or n.get("mode", 0) != 0:
            continue
        samplers += 1
        seen, cur = [], upstream(wf, n, "model")
        while cur is not None and cur["type"] not in LOADERS:
            seen.append(cur["type"])
            cur = upstream(wf, cur, "model")
        if cur is None:
            problems.append(f"node {n['id']} ({n['type']}) input 'model': no model loader upstream")
        elif "SparseAttentionPatch" not in seen:
            problems.append(f"node {n['id']} ({n['type']}) input 'model': comes from node {cur['id']} "
                            f"({cur['type']}) without a SparseAttentionPatch (path: {seen})")
    assert samplers, f"{path.name}: no sampler node"
    for p in nodes_of(wf, "SparseAttentionPatch"):
        if upstream(wf, p, "method") is None:
            problems.append(f"node {p['id']} (SparseAttentionPatch) input 'method': not connected (runs Radial "
                            "with defaults; connect a settings node)")
    assert not problems, f"{path.name}:\n" + "\n".join(problems)


# ---------------------------------------------------------------------------------------------------------------
# Against ComfyUI's node definitions

@comfyui
@pytest.mark.parametrize("path", FILES, ids=IDS)
def test_workflow_matches_node_definitions(path, catalog):
    errors = wc.check_workflow(wc.load_workflow(path), path.name, catalog)
    assert not errors, "\n".join(errors)


@comfyui
@pytest.mark.parametrize("path", FILES, ids=IDS)
def test_workflow_passes_comfyui_prompt_validation(path, catalog):
    wf = wc.load_workflow(path)
    assert not wc.check_workflow(wf, path.name, catalog), "the file check fails first"
    errors = wc.comfyui_validation_errors(wf, path.name, catalog)
    assert not errors, "\n".join(errors)


@comfyui
@pytest.mark.parametrize("path", FILES, ids=IDS)
def test_pack_nodes_run_with_the_workflow_settings(path, catalog):
    """The pack's nodes of the workflow, called with its values as ComfyUI would (settings nodes first, then the
    patch on a tiny Wan model), build their settings without error: the values are valid for the code too."""
    import comfy_env

    prompt = wc.to_api_prompt(wc.load_workflow(path), catalog)
    outputs, patched = {}, 0
    model = comfy_env.tiny_wan_t2v()
    for nid, item in sorted(prompt.items(), key=lambda kv: kv[1]["class_type"] != "RadialAttentionMask"):
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
@pytest.mark.parametrize("path", FILES, ids=IDS)
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
        for (inp, role), value in zip(d.widget_slots(), n.get("widgets_values", [])):
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


# ---------------------------------------------------------------------------------------------------------------
# The check itself: broken copies of a shipped workflow fail, naming the file, the node and the input

def _first(wf, type_name):
    return nodes_of(wf, type_name)[0]


def _set_widget(catalog, wf, type_name, input_name, value):
    n = _first(wf, type_name)
    slots = catalog.get(type_name).widget_slots()
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


MUTATIONS = [rename_type, cfg_above_max, decay_below_min, dense_layers_not_int, backend_not_an_option,
             block_size_as_string, sink_not_bool, sampler_not_an_option, control_value_dropped, positive_disconnected,
             method_fed_a_model, link_missing_on_output]


@comfyui
@pytest.mark.parametrize("mutate", MUTATIONS, ids=[m.__name__ for m in MUTATIONS])
def test_broken_copy_fails_naming_file_node_and_input(mutate, catalog, tmp_path):
    source = wc.WORKFLOWS_DIR / "wan2.1_t2v_radial.json"
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
    source = wc.WORKFLOWS_DIR / "wan2.1_t2v_radial.json"
    wf = copy.deepcopy(wc.load_workflow(source))
    n, input_name, _ = mutate(catalog, wf)
    errors = wc.comfyui_validation_errors(wf, source.name, catalog)
    assert any(f"node {n['id']} ({n['type']}) input '{input_name}'" in e for e in errors), "\n".join(errors)
