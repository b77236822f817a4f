"""The three ways the same files are imported: as a host package, as top-level packages, via ``python -m``."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from packs import ROOT

HOST_MODULES = ("comfy", "comfy_api", "folder_paths", "modules", "gradio", "nodes")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True)


def test_core_and_trainer_import_no_host_module():
    result = _run(f"""
        import sys
        import waveft_core, waveft_core.cli, waveft_core.convert, waveft_core.comfy_protocol
        import trainer, trainer.demo, trainer.engine, trainer.checkpoint, trainer.plot, trainer.__main__
        leaked = [m for m in {HOST_MODULES!r} if m in sys.modules]
        assert not leaked, leaked
    """)
    assert result.returncode == 0, result.stderr


def test_pack_loads_under_any_name_without_comfyui():
    """ComfyUI imports the folder under its (arbitrary, maybe dashed) name; outside ComfyUI no node loads."""
    result = _run("""
        import sys
        sys.path.insert(0, "tests")
        from packs import load_pack
        pack = load_pack("ComfyUI-WaveFT-main")
        import importlib
        core = importlib.import_module("ComfyUI-WaveFT-main.waveft_core")
        assert core.sample_positions(4, 4, 3).numel() == 3
        assert not hasattr(pack, "comfy_entrypoint")
        assert "ComfyUI-WaveFT-main.nodes" not in sys.modules
    """)
    assert result.returncode == 0, result.stderr


def test_python_dash_m_entry_points():
    for command, expected in ((["waveft_core", "--help"], "usage"), (["trainer", "demo", "--help"], "--steps")):
        result = subprocess.run([sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, (command, result.stderr)
        assert expected in result.stdout.lower(), command


def test_requirements_never_name_torch():
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    names = [line.split("=")[0].split(">")[0].split("<")[0].strip().lower() for line in lines if line and line[0] != "#"]
    assert not {"torch", "torchvision", "torchaudio"} & set(names)


def _imports_of(path) -> set[str]:
    """Modules of the same package a file imports, at any depth of the file (function-level imports too)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
    return found


def test_the_core_reads_top_down_without_an_import_cycle():
    """``waveft_core``'s modules form a DAG (geometry below the kernel families, plans above them, the file
    layer above the plans): a newcomer can read it bottom-up, and a new kernel family slots in beside them."""
    package = ROOT / "waveft_core"
    graph = {path.stem: _imports_of(path) & {p.stem for p in package.glob("*.py")} for path in package.glob("*.py")}
    graph.pop("__init__")
    graph.pop("__main__", None)
    state: dict[str, int] = {}

    def visit(module: str, trail: list[str]) -> None:
        if state.get(module) == 1:
            raise AssertionError(f"import cycle: {' -> '.join([*trail, module])}")
        if state.get(module) == 2:
            return
        state[module] = 1
        for imported in sorted(graph.get(module, ())):
            if imported != "__init__":
                visit(imported, [*trail, module])
        state[module] = 2

    for module in sorted(graph):
        visit(module, [])


def test_no_host_glue_imports_the_other_hosts_glue():
    """ComfyUI's nodes and the WebUI glue share code only through host-free modules."""
    import re

    for glue, other in (("nodes", "webui_ext"), ("webui_ext", "nodes")):
        for path in (ROOT / glue).glob("*.py"):
            text = path.read_text()
            assert not re.search(rf"from \.\.{other}\b|import {other}\b|\"{other}\.|'{other}\.", text), f"{glue}/{path.name} uses {other}"
