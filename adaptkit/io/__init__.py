"""Checkpoint I/O, no math: a validating lazy safetensors reader, sharded checkpoints, a streaming sharded
writer, atomic publication of output folders, aux-file copying and manifests.

Importing this package does not import torch (functions import it when they need it).
Rules and layouts: specs/checkpoint-io.md.
"""
from __future__ import annotations

from adaptkit.io.atomic import atomic_output_dir, check_output_target, clean_stale
from adaptkit.io.aux_files import AUX_FILES, copy_aux_files
from adaptkit.io.checkpoint import Checkpoint, open_checkpoint
from adaptkit.io.dtypes import ITEMSIZE, dtype_code, torch_dtype
from adaptkit.io.manifest import MANIFEST_NAME, verify_manifest, write_manifest
from adaptkit.io.safetensors import MAX_HEADER_SIZE, SafetensorsFile, TensorInfo
from adaptkit.io.sizes import format_size, parse_size
from adaptkit.io.writer import ShardedWriter, TensorSpec, plan_shards

__all__ = [
    "AUX_FILES",
    "Checkpoint",
    "ITEMSIZE",
    "MANIFEST_NAME",
    "MAX_HEADER_SIZE",
    "SafetensorsFile",
    "ShardedWriter",
    "TensorInfo",
    "TensorSpec",
    "atomic_output_dir",
    "check_output_target",
    "clean_stale",
    "copy_aux_files",
    "dtype_code",
    "format_size",
    "open_checkpoint",
    "parse_size",
    "plan_shards",
    "torch_dtype",
    "verify_manifest",
    "write_manifest",
]
