"""Where adapters live: the ``waveft`` model folder (beside ``loras``), listing, lookup and safe saving.

All functions take ComfyUI's ``folder_paths`` module as an argument, so the logic is tested without ComfyUI.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

FOLDER = "waveft"
LORA_FOLDER = "loras"
SAVE_FOLDERS = (FOLDER, LORA_FOLDER)
EXTENSIONS = {".safetensors", ".sft"}  # adapters are read as safetensors only: nothing is ever unpickled
_UNSAFE = re.compile(r"[^A-Za-z0-9._ -]+")
MAX_COMPONENT = 100
CHECKPOINTS = "checkpoints"  # models/waveft/checkpoints: training runs' latest adapters and resume states


def register_folder(folder_paths: ModuleType) -> list[str]:
    """Make ``models/waveft`` a model folder type (idempotent); returns its search paths.

    ``extra_model_paths.yaml`` is applied before custom nodes load and may already have created the entry,
    with an empty extension set (ComfyUI's "accept every file"): its paths are kept, first, so saving goes
    where the user pointed; the default folder is added after them and the extensions are set.
    """
    default = os.path.join(folder_paths.models_dir, FOLDER)
    paths = list(folder_paths.folder_names_and_paths.get(FOLDER, ([], set()))[0])
    if default not in paths:
        paths.append(default)
    folder_paths.folder_names_and_paths[FOLDER] = (paths, set(EXTENSIONS))
    getattr(folder_paths, "filename_list_cache", {}).pop(FOLDER, None)  # listed with the old extensions
    return paths


def _adapter_like(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in EXTENSIONS


NO_ADAPTERS = "(no adapters yet: put .safetensors files into models/loras or models/waveft, then press R)"


def adapter_files(folder_paths: ModuleType) -> list[str]:
    """Selectable adapters: the files of ``models/waveft``, the safetensors of ``models/loras``, and last the
    training checkpoints (``models/waveft/checkpoints``), so a new loader node never picks one by default."""
    own = [n for n in folder_paths.get_filename_list(FOLDER) if _adapter_like(n)]
    seen = set(own)
    listed = own + [n for n in folder_paths.get_filename_list(LORA_FOLDER) if _adapter_like(n) and n not in seen]
    in_checkpoints = [n for n in listed if n.replace("\\", "/").startswith(f"{CHECKPOINTS}/")]
    return [n for n in listed if n not in in_checkpoints] + in_checkpoints


def resolve(folder_paths: ModuleType, name: str) -> str:
    """Full path of a listed adapter (``waveft`` folders first, then ``loras``)."""
    if name == NO_ADAPTERS:
        raise FileNotFoundError(f"No WaveFT adapter selected: {NO_ADAPTERS[1:-1]}")
    for folder in (FOLDER, LORA_FOLDER):
        path = folder_paths.get_full_path(folder, name)
        if path is not None:
            return path
    raise FileNotFoundError(f"WaveFT adapter {name!r} is in neither models/{FOLDER} nor models/{LORA_FOLDER}")


def safe_stem(name: str) -> str:
    """A file-name stem from user text: subfolders kept, but no traversal, no odd characters, no extension."""
    # a component is cut to MAX_COMPONENT characters: with the run key, suffixes and a temporary name's
    # decorations it must stay under the file systems' 255-byte limit
    parts = [_UNSAFE.sub("_", part).strip(" .")[:MAX_COMPONENT].strip(" .") for part in re.split(r"[\\/]+", name)]
    parts = [part for part in parts if part and part not in (".", "..")]
    stem = "/".join(parts) or "waveft"
    for extension in EXTENSIONS:
        if stem.lower().endswith(extension):
            stem = stem[: -len(extension)] or "waveft"
    return stem


def checkpoint_path(folder_paths: ModuleType, name: str, key: str) -> Path:
    """``models/waveft/checkpoints/<name>-<key>.safetensors``: a training run's latest adapter, with its
    resume state beside it (``key`` names the run: see ``trainer.run_key``)."""
    folder = Path(folder_paths.get_folder_paths(FOLDER)[0]).resolve() / CHECKPOINTS
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{safe_stem(name).replace('/', '_')[:MAX_COMPONENT]}-{key}.safetensors"


def save_candidates(folder_paths: ModuleType, folder: str, name: str) -> Iterator[Path]:
    """The names a new save of ``name`` in ``folder`` may take, in order: ``name.safetensors``, then
    ``name_001.safetensors``, ``name_002``... (:func:`waveft_core.save_adapter_new` takes the first free one)."""
    if folder not in SAVE_FOLDERS:
        raise ValueError(f"folder must be one of {SAVE_FOLDERS}, got {folder!r}")
    base = Path(folder_paths.get_folder_paths(folder)[0]).resolve()
    stem = safe_stem(name)
    target = (base / stem).resolve()
    if os.path.commonpath([base, target]) != str(base):  # defence in depth; safe_stem already prevents it
        raise ValueError(f"refusing to save outside {base}: {name!r}")
    for counter in range(0, 100000):
        yield target.parent / (f"{target.name}.safetensors" if counter == 0 else f"{target.name}_{counter:03d}.safetensors")
