"""The headless run: one checkpoint, one or more subjects, and the training options (from flags or TOML).

Training options are :class:`trainer.TrainSettings` fields plus the WaveFT ones (:class:`waveft_core.WaveFTConfig`;
its ``seed`` is spelled ``position_seed`` here, beside the training ``seed``); :func:`option_fields` derives
them from the dataclasses, so the CLI, the TOML file and the engine can never disagree. A run file::

    checkpoint = "models/sd_xl_base_1.0.safetensors"
    cache_dir = "cache"                  # optional: latents and text embeddings kept across runs
    [train]                              # options for every subject (the paper's defaults otherwise)
    steps = 500
    [[subject]]
    images = "data/dog"
    prompt = "a photo of zjw dog"
    output = "out/zjw_dog.safetensors"
    learning_rate = 2e-4                 # any option: this subject only

Precedence: a subject's own keys, then options given on the command line, then ``[train]``, then defaults.
Relative paths in a file are relative to the file's folder.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._core import core
from ..settings import TrainSettings

MODEL_DTYPES = ("auto", "fp32", "fp16", "bf16")
RUN_KEYS = ("checkpoint", "cache_dir", "model_dtype", "train", "subject")
SUBJECT_KEYS = ("images", "prompt", "output")
_NOT_OPTIONS = ("base_model_name", "output_name", "waveft", "n_frequency_pattern")
_WAVEFT_RENAMED = {"seed": "position_seed"}


@dataclass(frozen=True)
class OptionField:
    """One training option: its name here, where it goes (``train`` or ``waveft`` field) and its type."""

    name: str
    target: str
    field_name: str
    kind: Any
    default: Any


def option_fields() -> list[OptionField]:
    """Every training option, derived from :class:`TrainSettings` and :class:`waveft_core.WaveFTConfig`."""
    out: list[OptionField] = []
    for target, cls in (("train", TrainSettings), ("waveft", core.WaveFTConfig)):
        hints = typing.get_type_hints(cls, vars(sys.modules[cls.__module__]))
        for f in dataclasses.fields(cls):
            if f.name in _NOT_OPTIONS or not f.init:
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            name = _WAVEFT_RENAMED.get(f.name, f.name) if target == "waveft" else f.name
            out.append(OptionField(name, target, f.name, hints[f.name], default))
    return out


OPTIONS = {option.name: option for option in option_fields()}


def _allowed(kind: str, keys: typing.Iterable[str]) -> str:
    return f"{kind} keys are {', '.join(sorted(keys))}"


def check_options(options: dict[str, Any], where: str) -> None:
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {', '.join(unknown)}; {_allowed('option', OPTIONS)}")


def build_settings(options: dict[str, Any], base_model_name: str, output_name: str) -> TrainSettings:
    """:class:`TrainSettings` from flat options (invalid values raise ``ValueError`` naming what is allowed)."""
    check_options(options, "settings")
    train = {OPTIONS[k].field_name: v for k, v in options.items() if OPTIONS[k].target == "train"}
    waveft = {OPTIONS[k].field_name: v for k, v in options.items() if OPTIONS[k].target == "waveft"}
    if "timestep_range" in train:
        train["timestep_range"] = tuple(train["timestep_range"])
    return TrainSettings(**train, base_model_name=base_model_name, output_name=output_name,
                         waveft=core.WaveFTConfig(**waveft))  # fmt: skip


@dataclass
class Subject:
    """One adapter to train: images (a folder), the instance prompt, the output file, own options."""

    images: Path
    prompt: str
    output: Path
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.images, self.output = Path(self.images), Path(self.output)
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError(f"subject {self.images}: prompt must be a non-empty string")
        if self.output.suffix != ".safetensors":
            raise ValueError(f"output must end in .safetensors; got {self.output}")
        check_options(self.options, f"subject {self.images}")


@dataclass
class RunConfig:
    """Everything a headless run needs. ``options`` apply to every subject unless a subject overrides them."""

    checkpoint: Path
    subjects: list[Subject]
    options: dict[str, Any] = field(default_factory=dict)
    cache_dir: Path | None = None
    model_dtype: str = "auto"
    resume: bool = False
    overwrite: bool = False
    cpu: bool = False

    def __post_init__(self) -> None:
        self.checkpoint = Path(self.checkpoint)
        self.cache_dir = Path(self.cache_dir) if self.cache_dir is not None else None
        if self.model_dtype not in MODEL_DTYPES:
            raise ValueError(f"model_dtype must be one of {', '.join(map(repr, MODEL_DTYPES))}; got {self.model_dtype!r}")
        if not self.subjects:
            raise ValueError("a run needs at least one subject")
        outputs = [s.output.resolve() for s in self.subjects]
        if len(set(outputs)) != len(outputs):
            raise ValueError("two subjects write the same output file")
        check_options(self.options, "run")
        for subject in self.subjects:  # fail on a bad value now, not after hours of training earlier subjects
            build_settings(self.subject_options(subject), "", "")

    def subject_options(self, subject: Subject) -> dict[str, Any]:
        return {**self.options, **subject.options}


def _table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a table; got {type(value).__name__}")
    return value


def load_run_file(path: Path, cli_options: dict[str, Any], **run: Any) -> RunConfig:
    """A :class:`RunConfig` from a TOML run file; ``cli_options`` beat ``[train]``, subjects beat both, and
    ``run`` (``checkpoint``, ``cache_dir``, ``model_dtype``, ... from the command line) beats the file's."""
    try:
        import tomllib  # Python 3.11+
    except ImportError:  # Python 3.10: the same parser, packaged as tomli
        try:
            import tomli as tomllib
        except ImportError:
            raise ValueError("--config needs Python 3.11+ (or pip install tomli on 3.10)") from None

    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: not valid TOML ({err})") from None
    unknown = sorted(set(data) - set(RUN_KEYS) - set(OPTIONS))
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {', '.join(unknown)}; {_allowed('top-level', RUN_KEYS)}")
    in_file = sorted(set(data) & set(OPTIONS))
    if in_file:
        raise ValueError(f"{path}: put training options ({', '.join(in_file)}) under [train] or a [[subject]]")
    folder = Path(path).parent
    subjects = [_subject(_table(entry, f"{path}: [[subject]] {n + 1}"), folder) for n, entry in
                enumerate(data.get("subject", []))]  # fmt: skip
    options = {**_table(data.get("train", {}), f"{path}: [train]"), **cli_options}
    file_run = {k: data[k] for k in ("checkpoint", "cache_dir", "model_dtype") if k in data}
    for key in ("checkpoint", "cache_dir"):
        if key in file_run:
            file_run[key] = folder / file_run[key]
    merged = {**file_run, **{k: v for k, v in run.items() if v is not None}}
    if "checkpoint" not in merged:
        raise ValueError(f"{path}: no checkpoint (set checkpoint = \"...\" or pass --checkpoint)")
    return RunConfig(subjects=subjects, options=options, **merged)


def _subject(entry: dict[str, Any], folder: Path) -> Subject:
    missing = [k for k in SUBJECT_KEYS if k not in entry]
    if missing:
        raise ValueError(f"[[subject]] lacks {', '.join(missing)}; {_allowed('subject', [*SUBJECT_KEYS, 'any option'])}")
    options = {k: v for k, v in entry.items() if k not in SUBJECT_KEYS}
    return Subject(folder / entry["images"], entry["prompt"], folder / entry["output"], options)
