"""Every shipped workflow in the real ComfyUI page: a real server on 127.0.0.1 (``COMFYUI_PATH``) with this pack
installed, its own frontend (the installed ``comfyui_frontend_package``, or ``COMFYUI_FRONTEND_ROOT``), and
headless Chromium (Debian's ``chromium``, or ``CHROMIUM``) driven by Playwright for Python.

For each workflow the page loads the UI file as a user does; then every widget, looked up by its name, must
hold the JSON's value (a missing or extra value shifts all later widgets, which a round trip of the values
would not notice), the prompt the page builds must pass the server's validation on ``/prompt``, and it must
equal the API-format copy in ``example_workflows/api/`` (``WAVEFT_UPDATE_API_WORKFLOWS=1`` rewrites those
copies from the page). Screenshots go to ``WAVEFT_SCREENSHOTS`` if set.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((ROOT / "example_workflows").glob("*.json"))
COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]  # fmt: skip


def _skip_reason() -> str | None:
    if not COMFYUI_PATH:
        return "set COMFYUI_PATH to a ComfyUI checkout to load the workflows in its real page"
    if not Path(CHROMIUM).is_file():
        return f"no Chromium at {CHROMIUM} (apt install chromium, or set CHROMIUM)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright for Python is not installed"
    if not os.environ.get("COMFYUI_FRONTEND_ROOT"):
        try:
            import comfyui_frontend_package  # noqa: F401
        except ImportError:
            return "no ComfyUI frontend: install the host's comfyui-frontend-package or set COMFYUI_FRONTEND_ROOT"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prepare_base(base: Path) -> None:
    """Models and inputs by the names the workflows use (validation checks names, not contents)."""
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / "comfyui-waveft").symlink_to(ROOT, target_is_directory=True)
    for folder, names in {"checkpoints": ["sd_xl_base_1.0.safetensors"], "waveft": ["zjw_dog.safetensors"]}.items():
        (base / "models" / folder).mkdir(parents=True)
        for name in names:
            (base / "models" / folder / name).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    (base / "input").mkdir()
    from PIL import Image

    Image.new("RGB", (64, 64), (120, 90, 60)).save(base / "input" / "example.png")


@pytest.fixture(scope="module")
def server():
    base = Path(tempfile.mkdtemp(prefix="waveft_page_"))
    _prepare_base(base)
    port = _free_port()
    command = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
               "--base-directory", str(base), "--disable-auto-launch"]  # fmt: skip
    if os.environ.get("COMFYUI_FRONTEND_ROOT"):
        command += ["--front-end-root", os.environ["COMFYUI_FRONTEND_ROOT"]]
    log = open(base / "server.log", "w")
    process = subprocess.Popen(command, cwd=COMFYUI_PATH, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            if process.poll() is not None:
                pytest.fail(f"ComfyUI exited: {(base / 'server.log').read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"{url}/object_info/WaveFTTrain", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("ComfyUI did not start within 120 s")
        yield url, base
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()
        (base / "custom_nodes" / "comfyui-waveft").unlink()  # never touch the repository itself
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    url, _ = server
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 2200, "height": 1500})  # fits the templates above 60% zoom, where text is drawn
        page.goto(url)
        page.wait_for_function("() => window.app && window.app.graph && window.app.extensionManager !== undefined", timeout=120_000)
        page.wait_for_timeout(1500)  # extensions (ours among them) register after the graph exists
        page.keyboard.press("Escape")  # newer frontends greet a first visit with the template browser
        yield page
        browser.close()


def _definitions(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/object_info", timeout=60) as response:
        return json.load(response)


def expected_widgets(node: dict, definition: dict) -> dict[str, object]:
    """Widget name -> value as the frontend assigns a UI workflow's ``widgets_values`` (positionally, with a
    control widget after every INT that asks for one or is named seed / noise_seed)."""
    values = list(node["widgets_values"])
    expected: dict[str, object] = {}
    declared = {**definition["input"].get("required", {}), **definition["input"].get("optional", {})}
    for name in definition.get("input_order", {}).get("required", []) + definition.get("input_order", {}).get("optional", []):
        kind, extras = declared[name][0], (declared[name][1] if len(declared[name]) > 1 else {})
        if not (isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")) or extras.get("forceInput"):
            continue
        if any(i["name"] == name and i.get("link") is not None and "widget" not in i for i in node["inputs"]):
            continue
        if not values:
            break
        expected[name] = value = values.pop(0)
        assert _fits(kind, extras, value), f"{node['type']}.{name}: {value!r} is no value for this widget"
        if kind == "INT" and extras.get("control_after_generate", name in ("seed", "noise_seed")):
            expected["control_after_generate"] = values.pop(0)
            assert expected["control_after_generate"] in ("fixed", "increment", "decrement", "randomize")
    if node["type"] == "LoadImage":
        values = values[1:]  # the upload button's value
    assert not values, f"{node['type']}: {len(values)} widget value(s) too many"
    return expected


def _fits(kind: object, extras: dict, value: object) -> bool:
    """Whether ``value`` is a value of a widget of this input type (what a one-place shift breaks)."""
    if isinstance(kind, list) or kind == "COMBO":
        return value in (kind if isinstance(kind, list) else extras.get("options", []))
    if kind == "INT":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "FLOAT":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, {"BOOLEAN": bool, "STRING": str}[kind])


PAGE_WIDGETS = """() => app.graph._nodes.map(n => ({id: n.id, type: n.type,
    widgets: Object.fromEntries((n.widgets || []).map(w => [w.name, w.value]))}))"""


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_loads_with_every_widget_in_place_and_passes_validation(server, page, path):
    url, _ = server
    workflow = json.loads(path.read_text())
    definitions = _definitions(url)
    page.evaluate("async (w) => { await app.loadGraphData(w); }", workflow)
    page.wait_for_timeout(500)
    on_page = {str(n["id"]): n for n in page.evaluate(PAGE_WIDGETS)}  # newer frontends report ids as strings
    assert {str(n["id"]) for n in workflow["nodes"]} <= set(on_page), (path.name, sorted(on_page))
    for node in workflow["nodes"]:
        if not node.get("widgets_values"):
            continue
        shown = on_page[str(node["id"])]["widgets"]
        for name, value in expected_widgets(node, definitions[node["type"]]).items():
            assert shown.get(name) == value, f"{path.name}: {node['type']}.{name} shows {shown.get(name)!r}, the file has {value!r}"
    if os.environ.get("WAVEFT_SCREENSHOTS"):
        page.evaluate("async () => { try { await app.extensionManager.command.execute('Comfy.Canvas.FitView') } catch (e) {} }")
        page.wait_for_timeout(300)
        Path(os.environ["WAVEFT_SCREENSHOTS"]).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(os.environ["WAVEFT_SCREENSHOTS"]) / f"{path.stem}.png"))
    prompt = page.evaluate("async () => (await app.graphToPrompt()).output")
    api_path = path.parent / "api" / path.name
    if os.environ.get("WAVEFT_UPDATE_API_WORKFLOWS"):  # regenerate the copies after a workflow changed
        api_path.parent.mkdir(exist_ok=True)
        api_path.write_text(json.dumps(prompt, indent=2) + "\n")
    api_copy = json.loads(api_path.read_text())
    assert prompt == api_copy, f"example_workflows/api/{path.name} differs from what the page builds"
    request = urllib.request.Request(f"{url}/prompt", data=json.dumps({"prompt": prompt, "front": True}).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.load(response)
    except urllib.error.HTTPError as err:
        pytest.fail(f"{path.name}: /prompt refused it: {err.read().decode()[:2000]}")
    assert answer.get("node_errors") == {}, answer
    urllib.request.urlopen(urllib.request.Request(f"{url}/interrupt", data=b"{}", method="POST"), timeout=10)


def test_the_template_browser_lists_the_workflows_under_readable_titles_with_thumbnails(server):
    """The browser shows a custom node pack's templates by file name: the names are the titles users read."""
    from urllib.parse import quote

    url, _ = server
    with urllib.request.urlopen(f"{url}/workflow_templates", timeout=30) as response:
        listed = json.load(response)["comfyui-waveft"]
    assert sorted(listed) == sorted(p.stem for p in WORKFLOWS) and all(name.startswith("WaveFT - ") for name in listed)
    for name in listed:
        for suffix in (".json", ".jpg"):
            with urllib.request.urlopen(f"{url}/api/workflow_templates/comfyui-waveft/{quote(name + suffix)}", timeout=30) as response:
                assert response.status == 200 and response.read(4), name + suffix


def test_a_new_waveft_train_node_keeps_its_seed_fixed(page):
    """Re-queueing continues a run only while the seed stays: the page must not randomise it unasked."""
    control = page.evaluate("""() => {
        const node = LiteGraph.createNode('WaveFTTrain');
        app.graph.add(node);
        const w = node.widgets.find(w => w.name === 'control_after_generate');
        const value = w && w.value;
        app.graph.remove(node);
        return value;
    }""")
    assert control == "fixed"
