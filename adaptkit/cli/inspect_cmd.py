"""``adaptkit inspect``: validate a checkpoint's headers and summarise it (reads no tensor data)."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import click


def _stored(path: Path, ckpt: Any) -> tuple[dict[str, int], dict[str, Any] | None]:
    """What is on disk for a checkpoint a loader dequantizes: stored dtypes and ``quantization_config``."""
    from adaptkit.io import open_checkpoint

    qconfig = None
    cfg_file = (path if path.is_dir() else path.parent) / "config.json"
    if cfg_file.is_file():
        try:
            qconfig = json.loads(cfg_file.read_text(encoding="utf-8")).get("quantization_config")
        except (ValueError, OSError, AttributeError):
            qconfig = None
    stored = getattr(ckpt, "stored_dtypes", None)
    if callable(stored):
        return dict(sorted(stored().items())), qconfig
    try:
        raw = open_checkpoint(path)
    except Exception:  # noqa: BLE001 - not a safetensors layout (GGUF names its types in source_format)
        return {}, qconfig
    try:
        return dict(sorted(Counter(raw.info(n).dtype for n in raw.names()).items())), qconfig
    finally:
        raw.close()


@click.command("inspect")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--tensors", is_flag=True, help="List every tensor (name, dtype, shape) as the loader presents it.")
@click.option("--allow-pickle", is_flag=True,
              help="Read legacy pickle weights (.bin/.pt) with torch.load(weights_only=True). Off by default.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(path: Path, tensors: bool, allow_pickle: bool, as_json: bool) -> None:
    """Validate the checkpoint at PATH (headers, offsets, shard index) and summarise it.

    PATH may be anything a loader reads: safetensors (file, folder, shards), a GPTQ/AWQ/bitsandbytes
    checkpoint (shown as the loader dequantizes it, with what is stored on disk), or a GGUF file.
    """
    from adaptkit.cli import get_host
    from adaptkit.io import format_size

    host = get_host()
    ckpt = host.open_model(path, allow_pickle=allow_pickle)
    try:
        names = ckpt.names()
        infos = [ckpt.info(n) for n in names]
        config = ckpt.config or {}
        source_format = getattr(ckpt, "source_format", None)
        doc: dict[str, Any] = {
            "path": str(path),
            "loader": getattr(ckpt, "loader", "adaptkit:safetensors"),
            "files": [str(Path(f).name) for f in ckpt.files],
            "tensors": len(names),
            "parameters": sum(i.numel for i in infos),
            "bytes": ckpt.total_bytes,
            "dtypes": dict(sorted(Counter(i.dtype for i in infos).items())),
            "architecture": (config.get("architectures") or [None])[0],
            "quantization": None,
        }
        if source_format is not None:
            stored, qconfig = _stored(path, ckpt)
            doc["quantization"] = {
                "format": source_format,
                "config": qconfig,
                "stored_dtypes": stored,
                "dequantized_on_load": True,
            }
        summary = getattr(ckpt, "adapter_summary", None)
        if callable(summary):  # a PEFT adapter folder: type, ranks, alpha, targets, recorded QLoRA base
            doc["adapter"] = summary()
        if tensors:
            doc["tensor_list"] = [{"name": i.name, "dtype": i.dtype, "shape": list(i.shape)} for i in infos]
    finally:
        ckpt.close()
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    click.echo(f"{doc['path']}: {doc['tensors']} tensors, {doc['parameters']:,} parameters, "
               f"{format_size(doc['bytes'])} in {len(doc['files'])} file(s) [{doc['loader']}]")
    q = doc["quantization"]
    if q:
        qc = q["config"] or {}
        keys = ["bits", "group_size", "desc_act", "sym", "version"]
        if qc.get("load_in_4bit"):
            keys += ["bnb_4bit_quant_type", "bnb_4bit_use_double_quant"]
        elif qc.get("load_in_8bit"):
            keys += ["load_in_8bit"]
        detail = ", ".join(f"{k} {qc[k]}" for k in keys if k in qc)
        click.echo(f"quantization: {q['format']}" + (f" ({detail})" if detail else "")
                   + "; tensors below are dequantized on load")
        if q["stored_dtypes"]:
            click.echo("stored dtypes: " + ", ".join(f"{k} x{v}" for k, v in q["stored_dtypes"].items()))
    click.echo(("dequantized dtypes: " if q else "dtypes: ") + ", ".join(f"{k} x{v}" for k, v in doc["dtypes"].items()))
    if doc["architecture"]:
        click.echo(f"architecture: {doc['architecture']}")
    if doc.get("adapter"):
        a = doc["adapter"]
        shown = {k: v for k, v in a.items() if k in ("peft_type", "r", "ranks", "lora_alpha", "alpha", "target_modules",
                                                     "mergeable", "base_quantization", "num_virtual_tokens")}
        click.echo("adapter: " + ", ".join(f"{k} {v}" for k, v in shown.items()))
    for t in doc.get("tensor_list", []):
        click.echo(f"  {t['name']}  {t['dtype']}  {tuple(t['shape'])}")
