"""The model catalogue: which folders hold models, and which one to serve at start.

A folder is a model when it has ``config.json`` and weights (safetensors, or
PyTorch ``.bin``), or a single ``.gguf`` file. Names from clients are plain
folder names, checked before any filesystem call.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llmwsd.config import Config
from llmwsd.errors import BadRequest, NotFound

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")


def validate_model_name(name: Any) -> str:
    """A model name is a plain folder name: no ``/``, no ``..``, no leading dot."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise BadRequest(
            f"invalid model name {str(name)[:80]!r}: use a plain folder name "
            "(letters, digits, '.', '_', '+', '-'; no '/', no '..', no leading dot)"
        )
    return name


def weight_files(folder: Path) -> list[Path]:
    safetensors = sorted(folder.glob("*.safetensors"))
    return safetensors or sorted(folder.glob("*.bin"))


def is_model_folder(folder: Path) -> bool:
    if not folder.is_dir() or folder.name.startswith("."):
        return False
    if (folder / "config.json").is_file() and weight_files(folder):
        return True
    return len(list(folder.glob("*.gguf"))) == 1


@dataclass(frozen=True)
class ModelEntry:
    name: str
    path: Path
    source: Path  # the model folder it was found in
    size_bytes: int
    modified: float
    architecture: str | None = None
    context_length: int | None = None
    dtype: str | None = None

    def to_dict(self, loaded_path: Path | None = None) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        data["source"] = str(self.source)
        data["size_mb"] = round(self.size_bytes / 1e6, 1)
        data["loaded"] = loaded_path is not None and self.path.resolve() == loaded_path.resolve()
        return data


def describe(folder: Path, source: Path) -> ModelEntry:
    files = [f for f in folder.rglob("*") if f.is_file()]
    config: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        config = json.loads((folder / "config.json").read_text())
    architectures = config.get("architectures") or [config.get("model_type")]
    return ModelEntry(
        name=folder.name,
        path=folder,
        source=source,
        size_bytes=sum(f.stat().st_size for f in files),
        modified=max((f.stat().st_mtime for f in files), default=folder.stat().st_mtime),
        architecture=architectures[0] if architectures else None,
        context_length=config.get("max_position_embeddings"),
        dtype=config.get("dtype") or config.get("torch_dtype"),
    )


def scan(dirs: list[Path]) -> list[ModelEntry]:
    """Every model in ``dirs``, in the order of ``dirs`` and then by name."""
    found: list[ModelEntry] = []
    seen: set[Path] = set()
    for source in dirs:
        if not source.is_dir():
            continue
        for folder in sorted(source.iterdir(), key=lambda p: p.name):
            if folder.resolve() in seen or not is_model_folder(folder):
                continue
            seen.add(folder.resolve())
            found.append(describe(folder, source))
    return found


def find(config: Config, name: str) -> ModelEntry:
    """The model called ``name`` in the known folders, or NotFound."""
    validate_model_name(name)
    for entry in scan(config.model_dirs):
        if entry.name == name:
            return entry
    raise NotFound(f"no model named {name!r} in {', '.join(map(str, config.model_dirs))}")


def select_model(config: Config, remembered: str | None = None) -> Path | None:
    """The model to serve at start: the configured path, else the remembered or first scanned."""
    if config.model.path:
        return Path(config.model.path)
    entries = scan(config.model_dirs)
    if remembered:
        for entry in entries:
            if entry.name == remembered:
                return entry.path
    # scan() lists the configured dirs before state_dir/models, each by name.
    return entries[0].path if entries else None
