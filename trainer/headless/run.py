"""Orchestration of a headless run: check, encode every subject (through the cache), load the UNet once,
train each subject's adapter in turn with :func:`trainer.train_waveft`, write the loss plots.

Stopping: the first Ctrl-C or SIGTERM asks every process to stop after the current step (the engine agrees
on the step across processes), saves the adapter and its resume state and exits with 130 / 143; a second
Ctrl-C interrupts at once (the last completed step is still saved). ``--resume`` continues exactly.
"""

from __future__ import annotations

import gc
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from ..checkpoint import state_path
from ..demo import diffusers_denoise, diffusers_name_to_prefix
from ..engine import TrainResult, train_waveft
from ..plot import encode_png, plot_losses
from ..progress import TextProgress
from .cache import DiskCache, Encoders, subject_data
from .config import RunConfig, Subject, build_settings
from .distributed import Process, setup
from .single_file import CheckpointReader, load_sdxl


class StopRequest:
    """Signal handlers that ask for a stop at the next step boundary; restores the old handlers on exit."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now (the engine still saves the last whole step)
        self.signal = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step (Ctrl-C again to stop at once)", flush=True)

    def __call__(self) -> bool:
        return self.signal is not None


def model_dtype(name: str, device: torch.device) -> torch.dtype:
    """``--model-dtype`` as a torch dtype (``auto``: fp32 on the CPU, else bf16 where native, else fp16)."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


@dataclass
class SubjectResult:
    subject: Subject
    result: TrainResult
    plot: Path | None


def check_outputs(config: RunConfig) -> None:
    """Refuse to replace an earlier run's adapter unless asked (``--resume`` continues it, ``--overwrite``)."""
    for subject in config.subjects:
        if subject.output.exists() and not (config.resume or config.overwrite):
            raise ValueError(f"{subject.output} exists: pass --resume to continue its run or --overwrite to start over")
        if config.overwrite and not config.resume:
            state_path(subject.output).unlink(missing_ok=True)


def encode_subjects(config: RunConfig, reader: CheckpointReader, process: Process, dtype: torch.dtype) -> tuple[list, dict]:
    """Every subject's :class:`TrainingData`; with a cache, rank 0 fills it first and the others read it."""
    encoders = Encoders(config.checkpoint, process.device, dtype)
    cache = DiskCache(config.cache_dir, writable=process.is_main)
    datasets = []
    with process.main_first():
        for subject in config.subjects:
            resolution = build_settings(config.subject_options(subject), "", "").resolution
            datasets.append(subject_data(subject.images, subject.prompt, resolution, encoders, reader, cache))
    calls = dict(encoders.calls)
    encoders.release()
    gc.collect()
    return datasets, calls


def train_subject(config: RunConfig, subject: Subject, unet: torch.nn.Module, data: Any, process: Process,
                  stop: StopRequest, schedule: dict[str, Any]) -> SubjectResult:  # fmt: skip
    options = {**schedule, **config.subject_options(subject)}  # the file's schedule unless a setting says otherwise
    settings = build_settings(options, config.checkpoint.name, subject.output.stem)
    if process.is_main:
        print(f"{subject.output.name}: {len(data)} images in {len(data.buckets)} buckets, {settings.steps} steps, "
              f"global batch {settings.batch_size * process.world_size} x {settings.grad_accum}", flush=True)  # fmt: skip
    subject.output.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"waveft_train_processes": str(process.world_size), "waveft_train_tool": "python -m trainer train"}
    result = train_waveft(
        unet, diffusers_denoise(unet), data, settings, name_to_prefix=diffusers_name_to_prefix,
        output_path=subject.output, progress=TextProgress() if process.is_main else None, should_stop=stop,
        resume=config.resume, metadata=metadata, distributed=process.collective,
    )  # fmt: skip
    plot = None
    if process.is_main and result.losses:
        plot = subject.output.with_name(subject.output.stem + "_loss.png")
        plot.write_bytes(encode_png(plot_losses(result.losses, title=subject.output.stem)))
    return SubjectResult(subject, result, plot)


def run(config: RunConfig, process: Process | None = None) -> dict[str, Any]:
    """Train every subject of ``config``; returns ``{"results", "encoded", "stopped_by", "seconds"}``."""
    started = time.monotonic()
    process = process or setup(config.cpu)
    reader = CheckpointReader(config.checkpoint)  # names a non-SDXL file before anything else happens
    check_outputs(config)
    dtype = model_dtype(config.model_dtype, process.device)
    datasets, encoded = encode_subjects(config, reader, process, dtype)
    checkpoint = load_sdxl(config.checkpoint, ("unet",), dtype)
    unet = checkpoint.unet.to(process.device)  # type: ignore[union-attr]
    results: list[SubjectResult] = []
    with StopRequest() as stop:
        for subject, data in zip(config.subjects, datasets, strict=True):
            schedule = {"prediction_type": checkpoint.prediction_type, "zero_terminal_snr": checkpoint.zero_terminal_snr}
            results.append(train_subject(config, subject, unet, data, process, stop, schedule))
            if results[-1].result.stopped:
                break
    process.barrier()
    if process.is_main:
        _report(results, stop.signal)
    return {"results": results, "encoded": encoded, "stopped_by": stop.signal, "seconds": time.monotonic() - started}


def _report(results: list[SubjectResult], stopped_by: int | None) -> None:
    for item in results:
        result = item.result
        state = "stopped" if result.stopped else "done"
        print(f"{item.subject.output}: {state} at step {result.steps_done}; loss plot {item.plot}", flush=True)
    if stopped_by is not None:
        print("stopped: run the same command with --resume to continue", flush=True)


def run_config(config: RunConfig) -> int:
    """:func:`run` for the command line: the exit code (0, or 128 + the signal after a stop)."""
    outcome = run(config)
    return 128 + outcome["stopped_by"] if outcome["stopped_by"] is not None else 0
