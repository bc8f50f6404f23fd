"""Byte-level corruption of real (tiny) checkpoints, written independently of adaptkit's reader."""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path


def read(path: Path) -> tuple[dict, bytes]:
    """(header as an ordered dict, data bytes) of a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write(path: Path, header: dict | str, data: bytes) -> None:
    text = header if isinstance(header, str) else json.dumps(header)
    raw = text.encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def tensors_in_data_order(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def shard(folder: Path, n: int = 2) -> list[str]:
    """Split ``folder/model.safetensors`` into ``n`` shards plus ``model.safetensors.index.json`` (like
    transformers' sharded save); returns the shard names."""
    header, data = read(folder / "model.safetensors")
    meta = header.pop("__metadata__", {"format": "pt"})
    names = tensors_in_data_order(header)
    groups = [names[i * len(names) // n:(i + 1) * len(names) // n] for i in range(n)]
    weight_map, total = {}, 0
    files = []
    for i, group in enumerate(groups, 1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        h, chunks, pos = {"__metadata__": meta}, [], 0
        for name in group:
            b, e = header[name]["data_offsets"]
            h[name] = {"dtype": header[name]["dtype"], "shape": header[name]["shape"], "data_offsets": [pos, pos + e - b]}
            chunks.append(data[b:e])
            pos += e - b
            weight_map[name] = fname
            total += e - b
        write(folder / fname, h, b"".join(chunks))
        files.append(fname)
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return files


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
