"""The extension in a real A1111 1.10 server and page: train in the WaveFT Train tab, then use the adapter.

Starts the real server on 127.0.0.1 (its own ``--data-dir`` in a temporary folder, this repository linked in as
its only extension, a tiny SDXL-family checkpoint from ``a1111_tiny_sdxl.py``), drives the tab in headless
Debian Chromium (``a1111_page_drive.py``) and generates through the server's API. Needs ``WEBUI_ROOT`` (with
``repositories/`` checked out, as A1111's first start leaves it), ``WEBUI_PYTHON`` (the Python of a venv with
A1111's requirements), a Hugging Face cache holding ``openai/clip-vit-large-patch14``'s tokenizer (``HF_HOME``),
Playwright and Chromium; ``tests/A1111_OFFLINE.md`` says how to set that up offline. Skipped otherwise.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WEBUI_ROOT = Path(os.environ.get("WEBUI_ROOT", "/nonexistent"))
WEBUI_PYTHON = os.environ.get("WEBUI_PYTHON", "")
CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))


def _missing() -> str | None:
    if not (WEBUI_ROOT / "launch.py").is_file():
        return "set WEBUI_ROOT to an A1111 1.10 checkout to run the real-page tests"
    if not (WEBUI_ROOT / "repositories" / "generative-models" / "sgm").is_dir():
        return f"{WEBUI_ROOT}/repositories/generative-models is missing (A1111 clones it at first start)"
    if not WEBUI_PYTHON or not Path(WEBUI_PYTHON).is_file():
        return "set WEBUI_PYTHON to the Python of a venv with A1111's requirements (tests/A1111_OFFLINE.md)"
    if not CHROMIUM.is_file():
        return f"no Chromium at {CHROMIUM}"
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "Playwright for Python is not installed"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))
STEPS = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(base: str, path: str, payload: dict | None = None, timeout: float = 300) -> dict | list:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def _write_images(folder: Path) -> list[Path]:
    from PIL import Image, ImageDraw

    folder.mkdir()
    paths = []
    for i, colour in enumerate([(200, 40, 40), (40, 160, 60), (50, 60, 200)]):
        image = Image.new("RGB", (256, 256), (230, 230, 220))
        ImageDraw.Draw(image).ellipse((40 + 20 * i, 50, 200, 210 - 10 * i), fill=colour)
        image.save(folder / f"subject{i}.png")
        paths.append(folder / f"subject{i}.png")
    return paths


@pytest.fixture(scope="module")
def webui(tmp_path_factory):
    """A real A1111 server on 127.0.0.1 with the tiny checkpoint loaded; yields (base URL, data dir, images)."""
    data = tmp_path_factory.mktemp("a1111-data")
    models = data / "models" / "Stable-diffusion"
    env = {**os.environ, "WEBUI_ROOT": str(WEBUI_ROOT), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    subprocess.run([WEBUI_PYTHON, str(ROOT / "tests" / "a1111_tiny_sdxl.py"), str(models)], env=env, check=True, timeout=600)
    (data / "extensions").mkdir()
    (data / "extensions" / "waveft").symlink_to(ROOT, target_is_directory=True)
    # the default live preview ("Approx NN") downloads a model at the first generation
    (data / "config.json").write_text(json.dumps({"show_progress_type": "Approx cheap", "live_previews_enable": False}))
    port = _free_port()
    log = (data / "server.log").open("w")
    server = subprocess.Popen(
        [WEBUI_PYTHON, "launch.py", "--skip-prepare-environment", "--skip-torch-cuda-test", "--use-cpu", "all",
         "--no-half", "--precision", "full", "--no-download-sd-model", "--skip-version-check", "--api",
         "--port", str(port), "--data-dir", str(data), "--ckpt", str(models / "tiny_sdxl.safetensors")],
        cwd=WEBUI_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if server.poll() is not None:
                pytest.fail(f"A1111 exited at start-up:\n{(data / 'server.log').read_text()[-3000:]}")
            try:
                if _api(base, "/sdapi/v1/options", timeout=5).get("sd_model_checkpoint"):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"A1111 did not come up:\n{(data / 'server.log').read_text()[-3000:]}")
            time.sleep(2)
        yield base, data, _write_images(data / "subject")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


@pytest.fixture(scope="module")
def trained(webui):
    """One run of the WaveFT Train tab driven in the page, gradient checkpointing on (the default)."""
    from a1111_page_drive import drive_train_tab

    base, data, images = webui
    shots = Path(os.environ["WAVEFT_SCREENSHOTS"]) if os.environ.get("WAVEFT_SCREENSHOTS") else None
    # 512 px: a step of the tiny model then lasts a few of the page's 1 s status polls, so "step 1/N running"
    # is on screen long enough to be seen (at 256 px an idle machine finished step 1 between two polls)
    run = drive_train_tab(base, images, steps=STEPS, resolution=512, name="page_subject", shots=shots, timeout_s=900)
    return run, data / "models" / "Lora" / "page_subject.safetensors"


def test_the_tab_shows_the_run_from_step_1_and_after_a_reload(trained, webui):
    run, _ = trained
    assert run.initial_status.startswith("No WaveFT training has run"), run.timeline
    assert run.first_step_status.startswith(f"WaveFT training: step 1/{STEPS} running"), run.timeline
    # the reloaded page picks the job up on load, and Show status follows it (or its summary, if it ended)
    for status in (run.on_load_status, run.show_status_status):
        assert status.startswith(("WaveFT training: step", f"Trained {STEPS} steps")), run.timeline
    assert run.final_status.startswith(f"Trained {STEPS} steps, last loss"), (run.final_status, run.timeline)
    assert "saved as page_subject.safetensors" in run.final_status


def test_the_saved_adapter_is_complete(trained):
    from waveft_core import load_adapter

    _, path = trained
    adapter = load_adapter(path)
    assert len(adapter.layers) == 96  # the tiny UNet's attention projections (12 blocks x 2 attentions x 4)
    assert any(float(layer.coef.abs().sum()) > 0 for layer in adapter.layers.values())
    assert adapter.metadata.get("ss_resolution") == "(512, 512)"
    assert path.with_suffix(".preview.png").is_file() and path.with_suffix(".waveft-state").is_file()


def _image(base: str, prompt: str):
    import numpy as np
    from PIL import Image

    payload = {"prompt": prompt, "steps": 2, "width": 256, "height": 256, "seed": 1234, "sampler_name": "Euler", "cfg_scale": 5}
    result = _api(base, "/sdapi/v1/txt2img", payload)
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(result["images"][0]))), dtype=np.int16), result["info"]


def test_the_adapter_changes_images_through_both_tags_and_is_removed_exactly(trained, webui):
    base, _, _ = webui
    _api(base, "/sdapi/v1/refresh-loras", {})
    plain, _ = _image(base, "a photo of zjw dog")
    waveft, info = _image(base, "a photo of zjw dog <waveft:page_subject:2>")
    lora, _ = _image(base, "a photo of zjw dog <lora:page_subject:2>")
    zero, _ = _image(base, "a photo of zjw dog <waveft:page_subject:0>")
    again, _ = _image(base, "a photo of zjw dog")
    assert abs(waveft - plain).mean() > 0.05, "the trained adapter does not change the image"
    assert (waveft == lora).all()  # the card's <lora:> tag applies the same file the same way
    assert (zero == plain).all() and (again == plain).all()  # strength 0, and the weights restored after use
    assert "page_subject" in json.loads(info)["infotexts"][0]  # Lora hashes / the tag in PNG info


def test_the_lora_card_shows_the_adapter(trained, webui):
    from a1111_page_drive import CHROMIUM_FLAGS
    from playwright.sync_api import sync_playwright

    base, _, _ = webui
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(base, wait_until="domcontentloaded", timeout=120_000)
        page.locator("#txt2img_extra_tabs button", has_text="Lora").first.click(timeout=120_000)
        page.locator("#txt2img_lora_extra_refresh").first.click()  # lists adapters saved since start-up
        card = page.locator('#txt2img_lora_cards .card[data-name="page_subject"]')
        card.wait_for(timeout=60_000)
        assert "page_subject" in card.inner_text()
        if os.environ.get("WAVEFT_SCREENSHOTS"):  # the Lora tab from its tab bar down to the card
            pane, box = page.locator("#txt2img_extra_tabs").bounding_box(), card.bounding_box()
            clip = {"x": pane["x"], "y": pane["y"], "width": min(pane["width"], 760), "height": box["y"] + box["height"] - pane["y"] + 8}
            page.screenshot(path=str(Path(os.environ["WAVEFT_SCREENSHOTS"]) / "a1111_lora_card.png"), clip=clip)
        browser.close()
