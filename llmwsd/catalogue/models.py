"""The model catalogue: which folders hold models, and which one to serve at start.

A folder is a model when it has ``config.json`` and weights (safetensors, or
PyTorch ``.bin``), or a single ``.gguf`` file. Names from clients are plain
folder names, checked before any filesystem call.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import struct
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from llmwsd.config import Config
from llmwsd.errors import BadRequest, NotFound

log = logging.getLogger("llmwsd.models")

REMEMBERED_FILE = "selected-model.json"  # in the state folder: the model to serve after a restart

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")


def validate_model_name(name: Any) -> str:
    """A model name is a plain folder name: no ``/``, no ``..``, no leading dot."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise BadRequest(
            f"invalid model name {str(name)[:80]!r}: use a plain folder name "
            "(letters, digits, '.', '_', '+', '-'; no '/', no '..', no leading dot)"
        )
    return name


def find_by_path(config: Config, text: Any) -> ModelEntry:
    """The catalogue entry a client's ``model_path`` names: ``NAME``, ``models/NAME`` or a path.

    Only folders in the catalogue qualify: the last part is checked as a name
    first, and the path must then be that entry's own folder (relative paths may
    name the entry's model folder by its last part, as the original LLMWS server's ``models/NAME``).
    """
    if not isinstance(text, str) or not text or "\x00" in text:
        raise BadRequest("model_path must be a non-empty string")
    path = PurePosixPath(text)
    if ".." in path.parts:
        raise BadRequest(f"invalid model path {text[:80]!r}: '..' is not allowed")
    entry = find(config, validate_model_name(path.name))
    if path.is_absolute():
        matches = Path(path).resolve() == entry.path.resolve()
    else:
        matches = len(path.parts) == 1 or path.parts[:-1] == (entry.source.name,)
    if not matches:
        raise BadRequest(f"{text[:200]!r} is not a folder of the model catalogue")
    return entry


def remembered_model(state_dir: Path) -> str | None:
    """The model chosen last with switch, if any (a broken file counts as none)."""
    try:
        name = json.loads((state_dir / REMEMBERED_FILE).read_text())["model"]
        return validate_model_name(name)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, BadRequest) as e:
        log.warning("ignoring %s: %s", state_dir / REMEMBERED_FILE, e)
        return None


def remember_model(state_dir: Path, name: str) -> None:
    """Write the choice atomically, so that a crash leaves the old choice or the new one."""
    path = state_dir / REMEMBERED_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"model": name}) + "\n")
    os.replace(tmp, path)


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
    parameters: int | None = None
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
    parameters, stored_dtype = safetensors_summary(folder)
    return ModelEntry(
        name=folder.name,
        path=folder,
        source=source,
        size_bytes=sum(f.stat().st_size for f in files),
        modified=max((f.stat().st_mtime for f in files), default=folder.stat().st_mtime),
        architecture=architectures[0] if architectures else None,
        parameters=parameters,
        context_length=config.get("max_position_embeddings"),
        dtype=config.get("dtype") or config.get("torch_dtype") or stored_dtype,
    )


_SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}
_HEADER_LIMIT = 100 * 1024 * 1024  # the format's own bound on a header


def safetensors_summary(folder: Path) -> tuple[int | None, str | None]:
    """Parameter count and the most common dtype, read from the safetensors headers only.

    A header is a little-endian u64 length and that much JSON: no tensor is read,
    so this stays cheap for a catalogue listing. Unreadable files give (None, None).
    """
    counts: dict[str, int] = {}
    total = 0
    try:
        for path in weight_files(folder):
            if path.suffix != ".safetensors":
                return None, None
            with path.open("rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                if length > _HEADER_LIMIT:
                    return None, None
                header = json.loads(f.read(length))
            for key, tensor in header.items():
                if key == "__metadata__":
                    continue
                n = math.prod(tensor["shape"])
                total += n
                counts[tensor["dtype"]] = counts.get(tensor["dtype"], 0) + n
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None, None
    if not counts:
        return None, None
    common = max(counts, key=lambda k: counts[k])
    return total, _SAFETENSORS_DTYPES.get(common, common.lower())


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
