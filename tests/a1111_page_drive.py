"""Drive the *WaveFT Train* tab of a running A1111 1.10 page in headless Chromium (Playwright for Python).

A real server must be up with an SDXL(-family) checkpoint loaded (``tests/a1111_tiny_sdxl.py`` writes a tiny
one). :func:`drive_train_tab` opens the page, uploads the images, sets the steps and the resolution, clicks
*Train*, records every status text it sees (with the time since the click), reloads the page once a step is
reported, checks that the reloaded page follows the running job on load and with *Show status*, and waits
for the final summary. It returns what it saw; it asserts nothing itself, so a pytest page test can decide.

Usage: ``python tests/a1111_page_drive.py --base-url http://127.0.0.1:7861 IMG1.png IMG2.png [--steps 6]``
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]  # fmt: skip
TAB = "#tab_waveft_train"
DONE_MARKERS = ("Trained ", "Interrupted after", "WaveFT training failed")
RUNNING_MARKERS = ("WaveFT: starting", "WaveFT: preparing", "WaveFT: waiting", "WaveFT training: step")


@dataclass
class PageRun:
    """What the page showed: ``timeline`` is ``[seconds since Train was clicked, page, status]``."""

    name: str
    timeline: list[tuple[float, str, str]] = field(default_factory=list)
    initial_status: str = ""  # on the first page load, before Train
    first_step_status: str = ""
    on_load_status: str = ""  # on the reloaded page, before Show status
    show_status_status: str = ""
    final_status: str = ""
    seconds_to_first_step: float | None = None
    seconds_total: float | None = None
    screenshots: list[str] = field(default_factory=list)


def _open_tab(page, base_url: str, timeout_s: float) -> None:
    page.goto(base_url, wait_until="domcontentloaded", timeout=timeout_s * 1000)
    button = page.locator("#tabs button", has_text="WaveFT Train").first
    button.wait_for(timeout=timeout_s * 1000)
    button.click()
    page.locator(TAB).wait_for(state="visible", timeout=timeout_s * 1000)


def _status(page) -> str:
    return page.locator(TAB).get_by_label("Status").input_value()


def _shot(page, run: PageRun, shots: Path | None, label: str) -> None:
    """A small PNG of the tab (palette-reduced if Pillow is there, to stay near 150 KB)."""
    if shots is None:
        return
    shots.mkdir(parents=True, exist_ok=True)
    path = shots / f"{len(run.screenshots):02d}_{label}.png"
    page.locator(TAB).screenshot(path=str(path))
    try:
        from PIL import Image

        with Image.open(path) as image:
            small = image.convert("RGB").quantize(colors=64)
        small.save(path, optimize=True)
    except ImportError:
        pass
    run.screenshots.append(str(path))


def _watch(page, run: PageRun, t0: float, label: str, until, timeout_s: float, every: float = 0.2) -> str:
    """Poll the status box until ``until(status)``; every new text goes into the timeline."""
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        text = _status(page)
        if text != last:
            run.timeline.append((round(time.monotonic() - t0, 2), label, text))
            last = text
        if until(text) or time.monotonic() > deadline:
            return text
        time.sleep(every)


def _is_step(text: str) -> bool:
    return "WaveFT training: step" in text


def _is_done(text: str) -> bool:
    """The run's summary, its failure, or a refusal by the click handler (``WaveFT: <reason>``)."""
    return text.startswith(DONE_MARKERS) or (text.startswith("WaveFT: ") and not text.startswith(RUNNING_MARKERS))


def drive_train_tab(
    base_url: str,
    images: list[Path],
    steps: int = 6,
    resolution: int = 256,
    name: str | None = None,
    prompt: str = "a photo of zjw dog",
    shots: Path | None = None,
    timeout_s: float = 600,
    reload_during_run: bool = True,
    gradient_checkpointing: bool = True,
) -> PageRun:
    from playwright.sync_api import sync_playwright

    run = PageRun(name=name or f"tiny_page_{int(time.time())}")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        _open_tab(page, base_url, 120)
        tab = page.locator(TAB)
        run.initial_status = _status(page)  # the "no run yet" text (or the last run's summary)
        # gradio 3.41 lists the names at once but uploads in the background; a Train click before /upload has
        # answered makes the client upload again and the server may copy a still-empty file (sha1 da39a3ee...)
        with page.expect_response(lambda r: r.url.endswith("/upload") and r.request.method == "POST", timeout=60_000):
            tab.locator("input[type=file]").first.set_input_files([str(p) for p in images])
        for image in images:
            tab.get_by_text(Path(image).name).first.wait_for(timeout=60_000)
        page.wait_for_timeout(500)  # the component's value takes the server paths
        tab.get_by_label("Adapter name (saved in models/Lora)").fill(run.name)
        tab.get_by_label("Instance prompt").fill(prompt)
        tab.get_by_label("Steps", exact=True).fill(str(steps))
        box = tab.get_by_label("Gradient checkpointing (less memory, ~30% slower)")
        if box.is_checked() != gradient_checkpointing:
            box.click()
        slider_number = tab.locator('input[data-testid="number-input"]').first  # the Resolution slider's box
        slider_number.fill(str(resolution))
        slider_number.press("Tab")
        _shot(page, run, shots, "filled")

        before = _status(page)  # the last run's summary may still be there: wait for this run's first text
        t0 = time.monotonic()
        tab.get_by_role("button", name="Train", exact=True).click()
        _watch(page, run, t0, "page1", lambda s: s.startswith(RUNNING_MARKERS) or (s != before and _is_done(s)), 60)
        text = _watch(page, run, t0, "page1", lambda s: _is_step(s) or _is_done(s), timeout_s)
        run.first_step_status = text
        run.seconds_to_first_step = round(time.monotonic() - t0, 2)
        _shot(page, run, shots, "first_step")

        if reload_during_run and not _is_done(text):
            page.reload(wait_until="domcontentloaded")
            _open_tab(page, base_url, 120)
            run.on_load_status = _watch(
                page, run, t0, "reload-load", lambda s: _is_step(s) or _is_done(s) or "WaveFT" in s, 30
            )
            _shot(page, run, shots, "after_reload")
            tab = page.locator(TAB)
            tab.get_by_role("button", name="Show status", exact=True).click()
            time.sleep(1.5)  # the click's first status arrives within a poll (1 s)
            run.show_status_status = _watch(page, run, t0, "reload-show", lambda s: True, 1)

        run.final_status = _watch(page, run, t0, "final", _is_done, timeout_s)
        run.seconds_total = round(time.monotonic() - t0, 2)
        page.wait_for_timeout(1500)  # the loss plot arrives with the summary
        _shot(page, run, shots, "done")
        browser.close()
    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--base-url", default="http://127.0.0.1:7861")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--name", default=None)
    parser.add_argument("--shots", type=Path, default=None)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--no-reload", action="store_true")
    parser.add_argument("--no-checkpointing", action="store_true", help="untick Gradient checkpointing")
    args = parser.parse_args(argv)
    run = drive_train_tab(
        args.base_url,
        args.images,
        args.steps,
        args.resolution,
        args.name,
        shots=args.shots,
        timeout_s=args.timeout,
        reload_during_run=not args.no_reload,
        gradient_checkpointing=not args.no_checkpointing,
    )
    print(json.dumps(asdict(run), indent=1))


if __name__ == "__main__":
    main()
