"""``adaptkit inspect``: validate a checkpoint's headers and summarise it (reads no tensor data)."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import click


@click.command("inspect")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--tensors", is_flag=True, help="List every tensor (name, dtype, shape).")
@click.option("--allow-pickle", is_flag=True,
              help="Read legacy pickle weights (.bin/.pt) with torch.load(weights_only=True). Off by default.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(path: Path, tensors: bool, allow_pickle: bool, as_json: bool) -> None:
    """Validate the checkpoint at PATH (headers, offsets, shard index) and summarise it."""
    from adaptkit.cli import get_host
    from adaptkit.io import format_size

    host = get_host()
    entry = host.loaders.find(path) if path.exists() else None
    ckpt = host.open_model(path, allow_pickle=allow_pickle)
    try:
        names = ckpt.names()
        infos = [ckpt.info(n) for n in names]
        dtypes = Counter(i.dtype for i in infos)
        params = sum(i.numel for i in infos)
        config = ckpt.config or {}
        doc = {
            "path": str(path),
            "loader": entry.qualified_name if entry else "adaptkit:safetensors",
            "files": [str(Path(f).name) for f in ckpt.files],
            "tensors": len(names),
            "parameters": params,
            "bytes": ckpt.total_bytes,
            "dtypes": dict(sorted(dtypes.items())),
            "architecture": (config.get("architectures") or [None])[0],
            "quantization": (config.get("quantization_config") or {}).get("quant_method"),
        }
        if tensors:
            doc["tensor_list"] = [{"name": i.name, "dtype": i.dtype, "shape": list(i.shape)} for i in infos]
    finally:
        ckpt.close()
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    click.echo(f"{doc['path']}: {doc['tensors']} tensors, {doc['parameters']:,} parameters, "
               f"{format_size(doc['bytes'])} in {len(doc['files'])} file(s) [{doc['loader']}]")
    click.echo("dtypes: " + ", ".join(f"{k} x{v}" for k, v in doc["dtypes"].items()))
    if doc["architecture"]:
        click.echo(f"architecture: {doc['architecture']}" +
                   (f", quantized: {doc['quantization']}" if doc["quantization"] else ""))
    for t in doc.get("tensor_list", []):
        click.echo(f"  {t['name']}  {t['dtype']}  {tuple(t['shape'])}")
