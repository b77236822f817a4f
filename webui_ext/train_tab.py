"""The "WaveFT Train" tab (A1111 1.10, gradio 3.41; registered with ``script_callbacks.on_ui_tabs``).

A run goes to a background thread that holds A1111's GPU queue lock (so no image is generated while the
UNet is being trained) and ``shared.state`` (so the host's progress API and the Interrupt button work); the
click handler is a generator that streams the run's status into the tab until the thread is done, and a
closed browser tab does not stop or wedge the run.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..trainer import UI_DEFAULTS as D
from ..trainer import TrainResult, plot_losses
from ..waveft_core import supported_wavelets
from .train_a1111 import TrainRequest, a1111_pieces, run_training
from .train_data import list_images

POLL_SECONDS = 1.0


class TrainingJob:
    """One run in a daemon thread: ``lock`` and ``state.begin()/end()`` are held for exactly its duration."""

    current: TrainingJob | None = None

    def __init__(self, work: Callable[[], TrainResult], lock: Any, state: Any, name: str = "") -> None:
        self.work, self.lock, self.state, self.name = work, lock, state, name
        self.done = threading.Event()
        self.result: TrainResult | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="waveft-train", daemon=True)

    def _run(self) -> None:
        with self.lock:
            self.state.begin(job="waveft-train")
            try:
                self.result = self.work()
            except Exception as err:  # reported in the tab; the UI and the host keep running
                self.error = err
            finally:
                self.state.end()
                self.done.set()

    @classmethod
    def start(cls, work: Callable[[], TrainResult], lock: Any, state: Any, name: str = "") -> TrainingJob:
        if cls.current is not None and not cls.current.done.is_set():
            raise RuntimeError("a WaveFT training run is already in progress (Show status follows it)")
        cls.current = job = cls(work, lock, state, name)
        job.thread.start()
        return job


def collect_image_paths(uploads: list | None, folder: str) -> list[Path]:
    """Uploaded files (gradio 3 gives temp-file objects with ``.name``, gradio 4 plain paths) + a folder."""
    paths = [Path(getattr(item, "name", item)) for item in uploads or []]
    if folder and folder.strip():
        paths += list_images(folder.strip())
    return paths


def summary(result: TrainResult, name: str) -> str:
    how = "Interrupted after" if result.stopped else "Trained"
    loss = f", last loss {result.losses[-1]:.4f}" if result.losses else ""
    saved = f"saved as {result.saved_path.name}" if result.saved_path else "nothing saved (no step completed)"
    use = f" Use <lora:{name}:1> or <waveft:{name}:1> (refresh the Lora tab for its card)." if result.saved_path else ""
    return f"{how} {result.steps_done} steps{loss}; {saved}.{use}"


def train_clicked(
    request: TrainRequest, pieces: Callable = a1111_pieces, lock: Any = None, state: Any = None
) -> Iterator[tuple[str, Any]]:
    """Start a run and stream ``(status, loss plot)`` until it ends (``lock``/``state``: A1111's by default)."""
    if lock is None or state is None:
        from modules import call_queue, shared

        lock, state = call_queue.queue_lock, shared.state
    yield "WaveFT: starting (waiting for the GPU if an image is being generated)", None
    job = TrainingJob.start(lambda: run_training(request, pieces()), lock, state, request.name.strip())
    yield from follow(job, state)


def follow(job: TrainingJob, state: Any) -> Iterator[tuple[str, Any]]:
    """Stream ``(status, loss plot)`` of ``job`` until it ends, then its summary (any page may follow it)."""
    while not job.done.wait(POLL_SECONDS):
        yield (state.textinfo or "WaveFT: waiting for the GPU (an image is being generated)"), None
    if job.error is not None:
        yield f"WaveFT training failed: {type(job.error).__name__}: {job.error}", None
        return
    plot = plot_losses(job.result.losses, title=job.name).numpy() if job.result.losses else None
    yield summary(job.result, job.name), plot


def status_clicked(state: Any = None) -> Iterator[tuple[str, Any]]:
    """The current or last run's status, followed to its end: what a reloaded or second page shows."""
    job = TrainingJob.current
    if job is None:
        yield "No WaveFT training has run since the WebUI started.", None
        return
    if state is None:
        from modules import shared

        state = shared.state
    yield from follow(job, state)


def _on_click(uploads, folder, name, prompt, budget, steps, lr, wavelet, scaling, seed, resolution, resume, checkpointing):
    try:
        request = TrainRequest(
            name=name, prompt=prompt, image_paths=collect_image_paths(uploads, folder), budget=int(budget),
            steps=int(steps), learning_rate=float(lr), wavelet=wavelet, scaling=float(scaling), seed=int(seed),
            resolution=int(resolution), resume=bool(resume), gradient_checkpointing=bool(checkpointing),
        )
        yield from train_clicked(request)
    except Exception as err:  # bad input or a run already going: a message in the tab, not a traceback
        yield f"WaveFT: {err}", None


def create_tab() -> list[tuple[Any, str, str]]:
    """``on_ui_tabs`` callback: the tab's layout and events."""
    import gradio as gr

    with gr.Blocks(analytics_enabled=False) as tab:
        with gr.Row():
            with gr.Column():
                uploads = gr.File(label="Training images", file_count="multiple", file_types=["image"])
                folder = gr.Textbox(label="...or an image folder on the server", placeholder="/path/to/images")
                name = gr.Textbox(label="Adapter name (saved in models/Lora)", value="my_waveft")
                prompt = gr.Textbox(label="Instance prompt", value=D["instance_prompt"])
                with gr.Row():
                    budget = gr.Number(label="Budget p per layer", value=D["budget"], precision=0)
                    steps = gr.Number(label="Steps", value=D["steps"], precision=0)
                    lr = gr.Number(label="Learning rate", value=D["learning_rate"])
                with gr.Row():
                    wavelet = gr.Dropdown(label="Wavelet", choices=list(supported_wavelets()), value=D["wavelet"])
                    scaling = gr.Number(label="Scaling", value=D["scaling"])
                    seed = gr.Number(label="Seed", value=D["seed"], precision=0)
                with gr.Row():
                    resolution = gr.Slider(label="Resolution", minimum=256, maximum=1536, step=64, value=D["resolution"])
                    checkpointing = gr.Checkbox(label="Gradient checkpointing (less memory, ~30% slower)", value=True)
                    resume = gr.Checkbox(label="Continue a saved run of this name", value=False)
                with gr.Row():
                    train = gr.Button("Train", variant="primary")
                    interrupt = gr.Button("Interrupt")
                    show = gr.Button("Show status")
            with gr.Column():
                status = gr.Textbox(label="Status", interactive=False, lines=3)
                losses = gr.Image(label="Loss", interactive=False)
        inputs = [uploads, folder, name, prompt, budget, steps, lr, wavelet, scaling, seed, resolution, resume, checkpointing]
        train.click(fn=_on_click, inputs=inputs, outputs=[status, losses])
        interrupt.click(fn=_interrupt, inputs=[], outputs=[])
        show.click(fn=status_clicked, inputs=[], outputs=[status, losses])
        tab.load(fn=status_clicked, inputs=[], outputs=[status, losses])  # a reloaded page follows a running job
    return [(tab, "WaveFT Train", "waveft_train")]


def _interrupt() -> None:
    from modules import shared

    shared.state.interrupt()
