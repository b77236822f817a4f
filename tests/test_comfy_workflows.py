"""The example workflows: valid UI-format graphs with thumbnails (always); with ``COMFYUI_PATH``, every node
type exists in ComfyUI or this pack, and sockets and widget values agree with the real node definitions.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((ROOT / "example_workflows").glob("*.json"))
OUR_IDS = set(re.findall(r'node_id="(WaveFT\w+)"', "".join(p.read_text() for p in (ROOT / "nodes").glob("*.py"))))


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_there_are_the_two_examples():
    assert {p.stem for p in WORKFLOWS} >= {"WaveFT - Use an adapter (SDXL)", "WaveFT - Train a subject (SDXL)"}
    assert {"WaveFTLoader", "WaveFTLoaderModelOnly", "WaveFTApply", "WaveFTTrain", "WaveFTSave"} == OUR_IDS  # ids never change


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_is_a_consistent_ui_graph_with_a_thumbnail(path):
    workflow = _load(path)
    nodes = {node["id"]: node for node in workflow["nodes"]}
    assert workflow["version"] == 0.4 and workflow["last_node_id"] >= max(nodes)
    assert workflow["last_link_id"] >= max(link[0] for link in workflow["links"])
    for link_id, source, slot, target, target_slot, kind in workflow["links"]:
        output = nodes[source]["outputs"][slot]
        socket = nodes[target]["inputs"][target_slot]
        assert link_id in output["links"] and socket["link"] == link_id and output["type"] == socket["type"] == kind
    linked = {link[0] for link in workflow["links"]}
    for node in nodes.values():
        assert node["properties"]["Node name for S&R"] == node["type"]
        assert all(i["link"] is None or i["link"] in linked for i in node["inputs"])
        assert node["type"].startswith("WaveFT") <= (node["type"] in OUR_IDS)
    assert any(node["type"].startswith("WaveFT") for node in nodes.values())
    thumbnail = path.with_suffix(".jpg").read_bytes()
    assert thumbnail[:3] == b"\xff\xd8\xff" and thumbnail[-2:] == b"\xff\xd9" and len(thumbnail) < 100_000


@pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="set COMFYUI_PATH to check node types against a real ComfyUI")
@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_nodes_exist_and_match_their_definitions(path):
    from comfy_host import boot

    registry = boot()["nodes"].NODE_CLASS_MAPPINGS
    for node in _load(path)["nodes"]:
        assert node["type"] in registry, f"{path.name}: unknown node type {node['type']}"
        cls = registry[node["type"]]
        spec = cls.INPUT_TYPES()
        declared = {**spec.get("required", {}), **spec.get("optional", {})}
        sockets = {name: conf for name, conf in declared.items() if not (isinstance(conf[0], list) or conf[0] in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"))}
        widgets = [(name, conf) for name, conf in declared.items() if name not in sockets]
        for socket in node["inputs"]:
            assert socket["name"] in sockets and sockets[socket["name"]][0] == socket["type"], (node["type"], socket["name"])
        saved_outputs = [o["type"] for o in node["outputs"]]
        # a newer host may append outputs (0.30's SaveImage/PreviewImage pass their images on): links hold
        assert saved_outputs == list(cls.RETURN_TYPES)[: len(saved_outputs)], node["type"]
        values = list(node["widgets_values"])
        for name, conf in widgets:
            options = conf[0] if isinstance(conf[0], list) else conf[1].get("options") if conf[0] == "COMBO" else None
            value = values.pop(0)
            if options and name not in ("ckpt_name", "adapter_name", "image"):  # file lists depend on the user's folders
                assert value in options, (node["type"], name, value)
            # the page adds a "control after generate" widget where the input asks for one and, unless it
            # says False, to any INT named seed / noise_seed (the frontend's legacy rule)
            extras = conf[1] if len(conf) > 1 else {}
            if extras.get("control_after_generate", conf[0] == "INT" and name in ("seed", "noise_seed")):
                assert values.pop(0) in ("fixed", "increment", "decrement", "randomize")
        if node["type"] == "LoadImage":
            values = values[1:]  # the upload button's value
        assert not values, f"{node['type']}: {len(values)} widget value(s) too many"


@pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="set COMFYUI_PATH to check ComfyUI's template browser")
def test_template_browser_lists_the_examples_with_thumbnails():
    import asyncio

    from aiohttp import web
    from comfy_host import boot

    host = boot()
    from app.custom_node_manager import CustomNodeManager

    folder_paths = host["folder_paths"]
    saved = folder_paths.folder_names_and_paths["custom_nodes"]
    folder_paths.folder_names_and_paths["custom_nodes"] = ([str(host["work"] / "custom_nodes")], set())
    try:
        routes, app = web.RouteTableDef(), web.Application()
        CustomNodeManager().add_routes(routes, app, host["nodes"].LOADED_MODULE_DIRS.items())
        handler = next(route.handler for route in routes if route.path == "/workflow_templates")
        listed = json.loads(asyncio.run(handler(None)).body)
    finally:
        folder_paths.folder_names_and_paths["custom_nodes"] = saved
    assert sorted(listed["comfyui-waveft"]) == sorted(p.stem for p in WORKFLOWS)
    static = [r for r in app.router.resources() if r.canonical == "/api/workflow_templates/comfyui-waveft"]
    assert static and all((Path(static[0].get_info()["directory"]) / f"{p.stem}.jpg").is_file() for p in WORKFLOWS)
