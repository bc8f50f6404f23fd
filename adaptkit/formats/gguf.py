"""GGUF files (llama.cpp) of Llama-architecture models, read as a Hugging Face checkpoint.

``open_gguf(path)`` returns a :class:`GGUFCheckpoint`: the ``adaptkit.io.Checkpoint`` interface with Hugging
Face Llama tensor names and shapes (``model.embed_tokens.weight``, ``model.layers.N.self_attn.q_proj.weight``,
...), a ``config`` synthesised from the GGUF metadata (a ``LlamaForCausalLM`` ``config.json`` as a dict) and
``write_aux(dst, config=...)`` that writes the tokenizer files, chat template and generation config carried
inside the GGUF.

* The header is parsed here, with every count, length and offset checked against the file size (a truncated
  or garbled file is a one-line ``CheckpointError`` naming the file). Token and merge lists are skipped, not
  decoded, so opening takes milliseconds even for a 49k-token vocabulary (gguf-py's ``GGUFReader`` decodes
  every string: seconds). The file is memory-mapped; nothing is read until a tensor is asked for.
* ``get(name)`` reads that one tensor. F32/F16/BF16/F64 tensors keep their dtype (a zero-copy read-only view
  of the mapping unless it must be permuted or ``copy=True``); quantized tensors (Q4_0, Q4_1, Q8_0, K-quants,
  IQ-quants, ...: every type ``gguf.quants.dequantize`` handles) are dequantized to float32. llama.cpp's
  converter permutes the rows of ``attn_q``/``attn_k`` (and their biases) for its rotary layout; that is
  undone, so tensors equal the original Hugging Face weights (up to quantization).
* ``info(name).nbytes`` is the size of the tensor ``get`` returns (float32 for a quantized tensor), like a
  safetensors checkpoint; the stored bytes are ``info(name).stored_nbytes`` starting at ``info(name).offset``.
* ``source_format`` is ``None`` when every tensor is a float type, else ``"gguf:"`` + the sorted quantized
  type names joined by ``+`` (``"gguf:Q4_1+Q8_0"``). ``stored_dtypes()`` counts the GGUF types on disk.
* Llama 3 rope scaling (llama.cpp stores it as a ``rope_freqs.weight`` tensor of per-frequency factors) is
  turned back into ``rope_scaling`` ``{"rope_type": "llama3", ...}`` when the factors match the standard
  parameters; linear rope scaling from the metadata becomes ``{"rope_type": "linear", "factor": f}``.

:func:`detect` accepts a regular file whose name ends in ``.gguf`` (any case) or whose first four bytes are
``GGUF`` (Ollama blobs have no extension), and a folder holding exactly one ``*.gguf`` file and no
``*.safetensors`` (that file is opened). A ``.gguf`` file that is not GGUF inside is therefore claimed, so
that the error says so instead of failing to parse as safetensors. Split GGUF files (``gguf-split``) are
refused with the command that merges them.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
import threading
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adaptkit.errors import CheckpointError, OutputError
from adaptkit.io.dtypes import ITEMSIZE
from adaptkit.io.checkpoint import TensorIndex
from adaptkit.io.safetensors import TensorInfo, open_regular_file

__all__ = ["GGUFCheckpoint", "GGUFTensorInfo", "detect", "open_gguf", "SUPPORTED_ARCHITECTURES"]

GGUF_MAGIC = b"GGUF"
SUPPORTED_ARCHITECTURES = ("llama",)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4

# GGUF metadata value types: id -> (struct format, size)
_SCALARS: dict[int, tuple[str, int]] = {
    0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
    6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8),
}
_STRING, _ARRAY = 8, 9
_BOOL = 7
_FLOAT_TYPES = {6, 12}

# GGML float types kept as they are: GGML type name -> safetensors code
_FLOAT_CODES = {"F32": "F32", "F16": "F16", "BF16": "BF16", "F64": "F64"}
_INT_TYPES = {"I8", "I16", "I32", "I64"}

_BLOCK_RE = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)")
# GGUF block tensor -> (HF module, may have a bias)
_BLOCK_MAP = {
    "attn_q": ("self_attn.q_proj", True),
    "attn_k": ("self_attn.k_proj", True),
    "attn_v": ("self_attn.v_proj", True),
    "attn_output": ("self_attn.o_proj", True),
    "ffn_gate": ("mlp.gate_proj", True),
    "ffn_up": ("mlp.up_proj", True),
    "ffn_down": ("mlp.down_proj", True),
    "attn_norm": ("input_layernorm", False),
    "ffn_norm": ("post_attention_layernorm", False),
}
_GLOBAL_MAP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_ATTN = ("attn_q", "attn_k", "attn_v", "attn_output")
_MLP = ("ffn_gate", "ffn_up", "ffn_down")

_TORCH_DTYPE_NAME = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


# -- detection ---------------------------------------------------------------------------------------------


def _single_gguf(folder: Path) -> Path | None:
    """The one ``*.gguf`` file of ``folder`` when it has exactly one and no safetensors weights."""
    ggufs: list[Path] = []
    for entry in folder.iterdir():
        name = entry.name.lower()
        if name.endswith(".safetensors") or name.endswith(".safetensors.index.json"):
            return None
        if name.endswith(".gguf") and not name.startswith("."):
            ggufs.append(entry)
            if len(ggufs) > 1:
                return None
    if len(ggufs) == 1 and ggufs[0].is_file():
        return ggufs[0]
    return None


def _has_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def detect(path: Any) -> bool:
    """Cheap, never raises: is ``path`` a GGUF file (or a folder holding exactly one and no safetensors)?"""
    try:
        p = Path(path)
        if p.is_dir():
            single = _single_gguf(p)
            return single is not None and _has_magic(single)
        if not p.is_file():
            return False
        return p.name.lower().endswith(".gguf") or _has_magic(p)
    except Exception:  # noqa: BLE001 - detection must never fail: unreadable means "not mine"
        return False


# -- header parsing ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Array:
    """A metadata array, left undecoded: item type, item count, offset of the first item."""

    item_type: int
    count: int
    offset: int


@dataclass(frozen=True)
class _RawTensor:
    name: str
    dims: tuple[int, ...]  # GGML order: fastest-moving first
    type_id: int
    offset: int  # relative to the data section


@dataclass(frozen=True)
class GGUFTensorInfo(TensorInfo):
    """A :class:`~adaptkit.io.TensorInfo` (``dtype``/``shape``/``nbytes`` as ``get`` returns the tensor; ``offset``
    where its stored bytes begin) plus what is on disk: the GGUF tensor name, GGML type and stored byte count."""

    gguf_name: str
    gguf_type: str
    stored_nbytes: int


class _Cursor:
    __slots__ = ("buf", "pos", "size", "where")

    def __init__(self, buf: Any, size: int, where: str) -> None:
        self.buf, self.pos, self.size, self.where = buf, 0, size, where

    def fail(self, rule: str) -> CheckpointError:
        return CheckpointError(f"{self.where}: {rule}")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(
                f"file is truncated or corrupt: {what} at byte {self.pos} needs {n} bytes but the file has "
                f"{self.size}"
            )

    def unpack(self, fmt: str, size: int, what: str) -> tuple:
        self.need(size, what)
        out = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return out

    def string(self, what: str) -> str:
        (n,) = self.unpack("<Q", 8, what)
        self.need(n, what)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"file is corrupt: {what} at byte {self.pos - n} is not valid UTF-8") from None

    def skip_strings(self, count: int, what: str) -> None:
        self.need(count * 8, what)  # every string takes at least its 8-byte length
        buf, pos, size = self.buf, self.pos, self.size
        unpack = struct.unpack_from
        for _ in range(count):
            if pos + 8 > size:
                self.pos = pos
                self.need(8, what)
            (n,) = unpack("<Q", buf, pos)
            pos += 8 + n
        self.pos = pos
        if pos > size:
            self.pos = pos - 1
            raise self.fail(f"file is truncated or corrupt: {what} runs past the end of the file ({size} bytes)")

    def value(self, vtype: int, key: str, depth: int = 0) -> Any:
        what = f"metadata {key!r}"
        if vtype in _SCALARS:
            fmt, size = _SCALARS[vtype]
            return self.unpack(fmt, size, what)[0]
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            item_type, count = self.unpack("<IQ", 12, what)
            start = self.pos
            if item_type in _SCALARS:
                size = _SCALARS[item_type][1]
                self.need(count * size, what)
                self.pos += count * size
            elif item_type == _STRING:
                self.skip_strings(count, what)
            elif item_type == _ARRAY and depth < 4:
                self.need(count * 12, what)
                for _ in range(count):
                    self.value(_ARRAY, key, depth + 1)
            else:
                raise self.fail(f"file is corrupt: {what} is an array of unknown value type {item_type}")
            return _Array(item_type, count, start)
        raise self.fail(f"file is corrupt: {what} has unknown value type {vtype}")


def _parse_header(buf: Any, size: int, where: str) -> tuple[int, dict[str, Any], list[_RawTensor], int]:
    """``(version, metadata, tensors, data_start)``; every violation is a ``CheckpointError``."""
    cur = _Cursor(buf, size, where)
    if size < 4 or bytes(buf[:4]) != GGUF_MAGIC:
        head = bytes(buf[: min(size, 4)])
        raise cur.fail(f"not a GGUF file (starts with {head!r}, expected {GGUF_MAGIC!r})")
    cur.pos = 4
    (version,) = cur.unpack("<I", 4, "the version")
    if version not in (2, 3):
        if version & 0xFFFF == 0 and version:
            raise cur.fail("big-endian GGUF files are not supported")
        raise cur.fail(f"GGUF version {version} is not supported (supported: 2, 3)")
    n_tensors, n_kv = cur.unpack("<QQ", 16, "the tensor and metadata counts")
    # every metadata entry takes >= 13 bytes and every tensor entry >= 32: bounds the loops below
    if n_kv * 13 + n_tensors * 32 > size:
        raise cur.fail(
            f"file is truncated or corrupt: it declares {n_tensors} tensors and {n_kv} metadata entries, "
            f"more than {size} bytes can hold"
        )
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string("a metadata key")
        (vtype,) = cur.unpack("<I", 4, f"the type of metadata {key!r}")
        if key in metadata:
            raise cur.fail(f"file is corrupt: metadata key {key!r} appears twice")
        metadata[key] = cur.value(vtype, key)
    raw: list[_RawTensor] = []
    seen: set[str] = set()
    for _ in range(n_tensors):
        name = cur.string("a tensor name")
        (ndim,) = cur.unpack("<I", 4, f"the rank of tensor {name!r}")
        if not 1 <= ndim <= MAX_DIMS:
            raise cur.fail(f"file is corrupt: tensor {name!r} has {ndim} dimensions (GGUF allows 1 to {MAX_DIMS})")
        dims = cur.unpack(f"<{ndim}Q", 8 * ndim, f"the shape of tensor {name!r}")
        type_id, offset = cur.unpack("<IQ", 12, f"the type and offset of tensor {name!r}")
        if name in seen:
            raise cur.fail(f"file is corrupt: tensor {name!r} appears twice")
        seen.add(name)
        raw.append(_RawTensor(name, tuple(dims), type_id, offset))
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise cur.fail(f"file is corrupt: general.alignment must be a power of two (got {alignment!r})")
    data_start = (cur.pos + alignment - 1) // alignment * alignment
    for t in raw:
        if t.offset % alignment:
            raise cur.fail(f"file is corrupt: tensor {t.name!r} data offset {t.offset} is not a multiple of the "
                           f"alignment {alignment}")
    return version, metadata, raw, data_start


# -- the checkpoint ----------------------------------------------------------------------------------------


@dataclass
class _Tensor:
    hf_name: str
    gguf_name: str
    type_name: str
    code: str  # safetensors code of what get() returns
    shape: tuple[int, ...]  # HF order
    offset: int  # absolute
    stored_nbytes: int
    permute_heads: int | None  # undo llama.cpp's rotary row permutation with this many heads


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _undo_permute(t: Any, n_head: int) -> Any:
    """Inverse of llama.cpp's ``permute``: rows (n_head, 2, d/2) were reordered to (n_head, d/2, 2)."""
    rows = t.shape[0]
    rest = tuple(t.shape[1:])
    return t.reshape(n_head, rows // n_head // 2, 2, *rest).transpose(1, 2).reshape(rows, *rest).contiguous()


class GGUFCheckpoint(TensorIndex):
    """A GGUF file seen as a Hugging Face Llama checkpoint; see the module docstring."""

    loader: str = "adaptkit:gguf"

    def __init__(self, path: Path, gguf_file: Path) -> None:
        self.path = path
        self.gguf_file = gguf_file
        self._where = str(gguf_file)
        self._lock = threading.Lock()
        fd, size = open_regular_file(gguf_file, self._where)
        try:
            if size < 24:
                head = os.pread(fd, 4, 0)
                if head != GGUF_MAGIC:
                    raise CheckpointError(f"{self._where}: not a GGUF file (starts with {head!r}, expected {GGUF_MAGIC!r})")
                raise CheckpointError(f"{self._where}: file is truncated ({size} bytes, shorter than a GGUF header)")
            self._mm: mmap.mmap | None = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        self.size = size
        self._bytes: Any = None
        try:
            self.version, meta, raw, data_start = _parse_header(self._mm, size, self._where)
            self.gguf_metadata: dict[str, Any] = {k: v for k, v in meta.items() if not isinstance(v, _Array)}
            self._arrays = {k: v for k, v in meta.items() if isinstance(v, _Array)}
            self._data_start = data_start
            self._build(raw, data_start)
        except BaseException:
            self._mm = None
            raise

    # -- metadata helpers ----------------------------------------------------------------------------------
    def _fail(self, rule: str) -> CheckpointError:
        return CheckpointError(f"{self._where}: {rule}")

    def _int(self, key: str, default: Any = None, *, required: bool = False) -> Any:
        if key in self._arrays:
            arr = self._arrays[key]
            if arr.item_type not in _SCALARS or arr.item_type in _FLOAT_TYPES or arr.item_type == _BOOL:
                raise self._fail(f"metadata {key!r} must be an integer (got an array)")
            fmt = _SCALARS[arr.item_type][0][1]
            values = set(struct.unpack_from(f"<{arr.count}{fmt}", self._mm, arr.offset)) if arr.count else set()
            if len(values) != 1:
                raise self._fail(f"metadata {key!r} varies per layer ({sorted(values)[:4]}...), which Llama does not support")
            return values.pop()
        v = self.gguf_metadata.get(key)
        if v is None:
            if required:
                raise self._fail(f"metadata {key!r} is missing")
            return default
        if isinstance(v, bool) or not isinstance(v, int):
            raise self._fail(f"metadata {key!r} must be an integer (got {v!r})")
        return v

    def _float(self, key: str, default: float) -> float:
        v = self.gguf_metadata.get(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise self._fail(f"metadata {key!r} must be a finite number (got {v!r})")
        return float(v)

    def _str(self, key: str) -> str | None:
        v = self.gguf_metadata.get(key)
        if v is not None and not isinstance(v, str):
            raise self._fail(f"metadata {key!r} must be a string (got {v!r})")
        return v

    # -- building the HF view ------------------------------------------------------------------------------
    def _build(self, raw: list[_RawTensor], data_start: int) -> None:
        arch = self._str("general.architecture")
        if arch is None:
            raise self._fail("metadata 'general.architecture' is missing")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise self._fail(
                f"GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        split_count = self._int("split.count", 1)
        if split_count > 1:
            raise self._fail(
                f"this is part of a split GGUF ({split_count} files); merge them first: "
                "llama-gguf-split --merge <first part> <output.gguf>"
            )
        p = arch + "."
        n_layers = self._int(p + "block_count", required=True)
        hidden = self._int(p + "embedding_length", required=True)
        heads = self._int(p + "attention.head_count", required=True)
        kv_heads = self._int(p + "attention.head_count_kv", heads)
        if n_layers <= 0 or hidden <= 0 or heads <= 0 or kv_heads <= 0 or heads % kv_heads:
            raise self._fail(
                f"inconsistent metadata: block_count={n_layers}, embedding_length={hidden}, "
                f"head_count={heads}, head_count_kv={kv_heads}"
            )
        head_dim = self._int(p + "attention.key_length", None)
        if head_dim is None:
            if hidden % heads:
                raise self._fail(f"embedding_length {hidden} is not divisible by head_count {heads}")
            head_dim = hidden // heads
        v_dim = self._int(p + "attention.value_length", head_dim)
        if v_dim != head_dim:
            raise self._fail(f"attention.key_length {head_dim} != attention.value_length {v_dim}, "
                             "which Llama does not support")
        rot = self._int(p + "rope.dimension_count", head_dim)
        if rot != head_dim:
            raise self._fail(f"rope.dimension_count {rot} != head size {head_dim} (partial rotary), "
                             "which Llama does not support")
        if head_dim % 2:
            raise self._fail(f"head size {head_dim} is odd; rotary embeddings need an even size")

        tensors, qtypes, stored_types, rope_freqs = self._scan_tensors(raw, data_start, n_layers, heads, kv_heads)
        if "model.embed_tokens.weight" not in tensors:
            raise self._fail("tensor 'token_embd.weight' is missing")
        if "model.norm.weight" not in tensors:
            raise self._fail("tensor 'output_norm.weight' is missing")
        vocab = self._int(p + "vocab_size", None)
        if vocab is None:
            vocab = tensors["model.embed_tokens.weight"].shape[0]
        inter = self._int(p + "feed_forward_length", None)
        if inter is None:
            gate = tensors.get("model.layers.0.mlp.gate_proj.weight")
            if gate is None:
                raise self._fail(f"metadata '{p}feed_forward_length' is missing")
            inter = gate.shape[0]
        attention_bias = any(f".{part}.bias" in t.gguf_name for t in tensors.values() for part in _ATTN)
        mlp_bias = any(f".{part}.bias" in t.gguf_name for t in tensors.values() for part in _MLP)
        self._check_layout(tensors, n_layers, vocab, hidden, inter, heads * head_dim, kv_heads * head_dim,
                           attention_bias, mlp_bias)

        theta = self._float(p + "rope.freq_base", 10000.0)
        rope_scaling = self._rope_scaling(p, rope_freqs, theta, head_dim)
        # the dtype get() returns: float32 when anything is dequantized, else the dtype of most parameters
        if qtypes:
            dtype_name = "float32"
        else:
            by_code: Counter[str] = Counter()
            for t in tensors.values():
                by_code[t.code] += _numel(t.shape)
            dtype_name = _TORCH_DTYPE_NAME[by_code.most_common(1)[0][0]]
        cfg: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": inter,
            "num_hidden_layers": n_layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self._int(p + "context_length", 2048),
            "rms_norm_eps": self._float(p + "attention.layer_norm_rms_epsilon", 1e-6),
            "rope_theta": theta,
            "attention_bias": attention_bias,
            "mlp_bias": mlp_bias,
            "tie_word_embeddings": "lm_head.weight" not in tensors,
            "torch_dtype": dtype_name,
        }
        if rope_scaling is not None:
            cfg["rope_scaling"] = rope_scaling
        for key, gkey in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                          ("pad_token_id", "padding_token_id"), ("unk_token_id", "unknown_token_id")):
            v = self._int("tokenizer.ggml." + gkey, None)
            if v is not None:
                cfg[key] = v
        self._config = cfg
        self._tensors = dict(sorted(tensors.items(), key=lambda kv: kv[1].offset))
        self._infos = {
            name: GGUFTensorInfo(name, t.code, t.shape, self.gguf_file, t.offset,
                                 _numel(t.shape) * ITEMSIZE[t.code], t.gguf_name, t.type_name, t.stored_nbytes)
            for name, t in self._tensors.items()
        }
        self._stored_types = dict(sorted(stored_types.items()))
        self.source_format: str | None = ("gguf:" + "+".join(sorted(qtypes))) if qtypes else None

    def _scan_tensors(self, raw: list[_RawTensor], data_start: int, n_layers: int, heads: int,
                      kv_heads: int) -> tuple[dict[str, _Tensor], set[str], Counter[str], _RawTensor | None]:
        """Types, sizes, bounds and HF names of the tensor table: ``(tensors by HF name, quantized type names,
        stored type counts, the rope_freqs tensor if any)``."""
        import gguf
        import gguf.quants

        # what gguf.quants.dequantize handles (a private table; without it, failures surface in get())
        traits = getattr(gguf.quants, "_type_traits", None)
        tensors: dict[str, _Tensor] = {}
        qtypes: set[str] = set()
        stored_types: Counter[str] = Counter()
        extents: list[tuple[int, int, str]] = []
        rope_freqs: _RawTensor | None = None
        for t in raw:
            try:
                qt = gguf.GGMLQuantizationType(t.type_id)
            except ValueError:
                raise self._fail(
                    f"tensor {t.name!r} has GGML type id {t.type_id}, unknown to the installed gguf "
                    f"{_gguf_version()}; upgrade it: pip install -U gguf"
                ) from None
            tname = qt.name
            if tname in _INT_TYPES:
                raise self._fail(f"tensor {t.name!r} has integer type {tname}; Llama weights are floating point")
            if tname not in _FLOAT_CODES:
                if traits is not None and qt not in traits:
                    raise self._fail(
                        f"tensor {t.name!r} has type {tname}, which the installed gguf {_gguf_version()} cannot "
                        "dequantize; upgrade it: pip install -U gguf"
                    )
                qtypes.add(tname)
            block, type_size = gguf.GGML_QUANT_SIZES[qt]
            if t.dims[0] % block:
                raise self._fail(f"file is corrupt: tensor {t.name!r} row size {t.dims[0]} is not a multiple of "
                                 f"the {tname} block size {block}")
            stored = _numel(t.dims) // block * type_size
            start = data_start + t.offset
            if start + stored > self.size:
                raise self._fail(
                    f"file is truncated: tensor {t.name!r} ends at byte {start + stored} but the file has "
                    f"{self.size} bytes"
                )
            extents.append((start, start + stored, t.name))
            stored_types[tname] += 1
            if t.name == "rope_freqs.weight":
                rope_freqs = t
                continue
            if t.name in _GLOBAL_MAP:
                hf = _GLOBAL_MAP[t.name]
            else:
                m = _BLOCK_RE.fullmatch(t.name)
                if m is None or m.group(2) not in _BLOCK_MAP or (m.group(3) == "bias" and not _BLOCK_MAP[m.group(2)][1]):
                    raise self._fail(f"tensor {t.name!r} has no Hugging Face Llama counterpart")
                layer, part, kind = int(m.group(1)), m.group(2), m.group(3)
                if layer >= n_layers or m.group(1) != str(layer):
                    raise self._fail(f"tensor {t.name!r} is outside the {n_layers} blocks the metadata declares")
                hf = f"model.layers.{layer}.{_BLOCK_MAP[part][0]}.{kind}"
            permute = heads if ".attn_q." in t.name else kv_heads if ".attn_k." in t.name else None
            tensors[hf] = _Tensor(hf, t.name, tname, _FLOAT_CODES.get(tname, "F32"), tuple(reversed(t.dims)),
                                  start, stored, permute)
        extents.sort()
        for (_, a_end, a_name), (b_start, _, b_name) in zip(extents, extents[1:]):
            if b_start < a_end:
                raise self._fail(f"file is corrupt: the data of tensors {a_name!r} and {b_name!r} overlap")
        return tensors, qtypes, stored_types, rope_freqs

    def _check_layout(self, tensors: dict[str, _Tensor], n_layers: int, vocab: int, hidden: int, inter: int,
                      q_rows: int, kv_rows: int, attention_bias: bool, mlp_bias: bool) -> None:
        """Every Llama tensor is present (biases all or none) with the shape the metadata implies."""
        expected: dict[str, tuple[int, ...]] = {
            "model.embed_tokens.weight": (vocab, hidden),
            "model.norm.weight": (hidden,),
            "lm_head.weight": (vocab, hidden),
        }
        shapes = {
            "attn_q": (q_rows, hidden), "attn_k": (kv_rows, hidden), "attn_v": (kv_rows, hidden),
            "attn_output": (hidden, q_rows), "ffn_gate": (inter, hidden), "ffn_up": (inter, hidden),
            "ffn_down": (hidden, inter), "attn_norm": (hidden,), "ffn_norm": (hidden,),
        }
        biased = (_ATTN if attention_bias else ()) + (_MLP if mlp_bias else ())
        for layer in range(n_layers):
            for part, shape in shapes.items():
                module = f"model.layers.{layer}.{_BLOCK_MAP[part][0]}"
                expected[module + ".weight"] = shape
                expected[module + ".bias"] = shape[:1]
                for kind in ("weight", "bias") if part in biased else ("weight",):
                    if f"{module}.{kind}" not in tensors:
                        raise self._fail(f"tensor 'blk.{layer}.{part}.{kind}' is missing")
        for hf, t in tensors.items():
            if t.shape != expected[hf]:
                raise self._fail(
                    f"tensor {t.gguf_name!r} has shape {list(t.shape)} but the metadata implies {list(expected[hf])}"
                )

    def _rope_scaling(self, p: str, rope_freqs: _RawTensor | None, theta: float, head_dim: int) -> dict | None:
        kind = self._str(p + "rope.scaling.type")
        if kind not in (None, "none", "linear"):
            raise self._fail(f"rope scaling {kind!r} is not supported (supported: none, linear, llama3)")
        if kind == "linear":
            if rope_freqs is not None:
                raise self._fail("both linear rope scaling and per-frequency rope factors (rope_freqs.weight)")
            factor = self._float(p + "rope.scaling.factor", 1.0)
            return {"rope_type": "linear", "factor": factor} if factor != 1.0 else None
        if rope_freqs is None:
            return None
        n = head_dim // 2
        if rope_freqs.dims != (n,) or rope_freqs.type_id != 0:
            raise self._fail(f"tensor 'rope_freqs.weight' must be F32 of shape [{n}] (got {list(rope_freqs.dims)})")
        # its extent was bounds-checked with the other tensors
        factors = struct.unpack_from(f"<{n}f", self._mm, self._data_start + rope_freqs.offset)
        return _llama3_from_factors(factors, theta, head_dim, self._int(p + "rope.scaling.original_context_length", None),
                                    self._fail)

    # -- Checkpoint interface ------------------------------------------------------------------------------
    @property
    def files(self) -> list[Path]:
        return [self.gguf_file]

    @property
    def metadata(self) -> None:
        """Safetensors ``__metadata__`` (none for GGUF; the GGUF key/values are ``gguf_metadata``)."""
        return None

    @property
    def config(self) -> dict[str, Any]:
        """A ``LlamaForCausalLM`` ``config.json`` synthesised from the GGUF metadata (a fresh copy)."""
        return json.loads(json.dumps(self._config))

    @property
    def chat_template(self) -> str | None:
        v = self.gguf_metadata.get("tokenizer.chat_template")
        return v if isinstance(v, str) and v else None

    def _label(self) -> Any:
        return self._where

    def stored_dtypes(self) -> dict[str, int]:
        """How many tensors of each GGML type the file stores (``{"F32": 61, "Q4_1": 210, ...}``)."""
        return dict(self._stored_types)

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self._infos.values())

    def _byte_tensor(self) -> Any:
        b = self._bytes
        if b is not None:
            return b
        with self._lock:
            if self._bytes is None:
                if self._mm is None:
                    raise CheckpointError(f"{self._where}: file is closed")
                import torch

                with warnings.catch_warnings():
                    # read-only on purpose: callers must not write into returned views
                    warnings.simplefilter("ignore", UserWarning)
                    self._bytes = torch.frombuffer(self._mm, dtype=torch.uint8)
            return self._bytes

    def get(self, name: str, *, copy: bool = False) -> Any:
        """The tensor ``name``: its stored dtype for float types (a read-only view of the mapping unless it is
        permuted or ``copy=True``), float32 for quantized types (dequantized now, a fresh tensor)."""
        t = self._tensors.get(name)
        if t is None:
            raise CheckpointError(f"{self._where}: no tensor named {name!r}")
        import torch

        raw = self._byte_tensor()[t.offset : t.offset + t.stored_nbytes]
        if t.type_name in _FLOAT_CODES:
            from adaptkit.io.dtypes import torch_dtype

            fresh = bool(t.offset % ITEMSIZE[t.code])  # an alignment below the item size: copy to view it
            if fresh:
                raw = raw.clone()
            out = raw.view(torch_dtype(t.code)).view(t.shape)
        else:
            import gguf
            import numpy as np

            rows = t.shape[0] if len(t.shape) > 1 else 1
            data = raw.numpy().reshape(rows, -1) if t.stored_nbytes else np.empty((rows, 0), np.uint8)
            try:
                arr = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[t.type_name])
            except (ValueError, NotImplementedError) as e:
                raise CheckpointError(f"{self._where}: cannot dequantize tensor {t.gguf_name!r} ({t.type_name}): {e}") from None
            out = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).view(t.shape)
            fresh = True
        if t.permute_heads is not None:
            out = _undo_permute(out, t.permute_heads)
            fresh = True
        if copy and not fresh:
            out = out.clone()
        return out

    def write_aux(self, dst: str | os.PathLike[str], *, config: bool = False) -> list[str]:
        """Write the tokenizer (``tokenizer.json``, ``tokenizer_config.json`` and the chat template, as the installed
        transformers saves them), ``generation_config.json`` and, with ``config=True``, ``config.json`` into
        ``dst``; returns the file names written. Offline: transformers rebuilds the tokenizer from the GGUF."""
        dst = Path(dst)
        written: list[str] = []
        if "tokenizer.ggml.model" in self.gguf_metadata:
            written += self._write_tokenizer(dst)
        written.append(self._write_generation_config(dst))
        if config:
            _write_json(dst / "config.json", self._config)
            written.append("config.json")
        return written

    def _write_tokenizer(self, dst: Path) -> list[str]:
        import tempfile

        try:
            from transformers import AutoTokenizer
        except ImportError as e:  # pragma: no cover - transformers is a core dependency
            raise CheckpointError(f"{self._where}: writing its tokenizer needs transformers ({e})") from None
        with tempfile.TemporaryDirectory(prefix=".adaptkit-gguf-") as tmp:
            # a folder holding only the GGUF, so nothing beside the file (another tokenizer_config.json, ...) mixes in
            folder, name = Path(tmp), "model.gguf"
            try:
                os.symlink(self.gguf_file.resolve(), folder / name)
            except OSError:  # pragma: no cover - no symlinks here: load beside the file
                folder, name = self.gguf_file.parent, self.gguf_file.name
            try:
                tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=name, local_files_only=True)
            except Exception as e:  # noqa: BLE001 - transformers' errors vary; all mean "cannot build it"
                msg = " ".join(str(e).split())[:300]
                raise CheckpointError(
                    f"{self._where}: cannot build a tokenizer from the GGUF metadata ({type(e).__name__}: {msg})"
                ) from None
        try:
            saved = tok.save_pretrained(str(dst))
        except OSError as e:
            raise OutputError(f"{dst}: cannot write the tokenizer ({e.strerror})") from None
        tidy = dst / "tokenizer_config.json"
        if tidy.is_file():
            # loader-only keys out; transformers 5's class name becomes PreTrainedTokenizerFast (loads in 4.x and
            # 5.x); an unbounded model_max_length becomes the context length
            doc = json.loads(tidy.read_text(encoding="utf-8"))
            for key in ("is_local", "local_files_only", "gguf_file", "name_or_path"):
                doc.pop(key, None)
            doc["tokenizer_class"] = "PreTrainedTokenizerFast"
            doc["model_max_length"] = int(self._config.get("max_position_embeddings", 8192))
            _write_json(tidy, doc)
        names = []
        for f in saved or ():
            p = Path(f)
            if p.is_file() and p.parent.resolve() == dst.resolve() and p.name not in names:
                names.append(p.name)
        for extra in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
            if (dst / extra).is_file() and extra not in names:
                names.append(extra)
        return names

    def _write_generation_config(self, dst: Path) -> str:
        from transformers import GenerationConfig, LlamaConfig

        gen = GenerationConfig.from_model_config(LlamaConfig(**self._config))
        try:
            gen.save_pretrained(str(dst))
        except OSError as e:
            raise OutputError(f"{dst}: cannot write generation_config.json ({e.strerror})") from None
        return "generation_config.json"

    def close(self) -> None:
        with self._lock:
            # never mmap.close(): tensors handed out may still view the mapping; it goes with the last of them
            self._bytes = None
            self._mm = None

    def __enter__(self) -> "GGUFCheckpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GGUFCheckpoint({str(self.gguf_file)!r}, {len(self._infos)} tensors, {self.source_format or 'float'})"


def _write_json(path: Path, doc: Any) -> None:
    try:
        path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    except OSError as e:
        raise OutputError(f"{path}: cannot write ({e.strerror})") from None


def _gguf_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("gguf")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        return "(unknown version)"


def _llama3_factors(theta: float, head_dim: int, factor: float, low: float, high: float, old_ctx: int) -> list[float]:
    """llama.cpp's ``rope_freqs`` for Llama 3 rope scaling (convert_hf_to_gguf.py, LlamaModel)."""
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / (theta ** (i / head_dim))
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out


def _llama3_from_factors(factors: tuple[float, ...], theta: float, head_dim: int, original: int | None,
                         fail: Any) -> dict | None:
    if all(abs(f - 1.0) <= 1e-6 for f in factors):
        return None
    factor = float(max(factors))
    for old_ctx in dict.fromkeys(c for c in (original, 8192) if c):
        for low, high in ((1.0, 4.0),):
            want = _llama3_factors(theta, head_dim, factor, low, high, old_ctx)
            if all(math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6) for a, b in zip(factors, want)):
                return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                        "original_max_position_embeddings": old_ctx}
    raise fail("tensor 'rope_freqs.weight' holds rope factors that are not Llama 3 scaling with the standard "
               "parameters (low_freq_factor 1, high_freq_factor 4); not supported")


def open_gguf(path: str | os.PathLike[str], **options: Any) -> GGUFCheckpoint:
    """Open a GGUF file (or a folder holding exactly one) as a Hugging Face Llama checkpoint.

    ``options`` are the loader options every loader receives (``allow_pickle``, ...); none applies to GGUF.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    gguf_file = p
    if p.is_dir():
        single = _single_gguf(p)
        if single is None:
            raise CheckpointError(f"{p}: expected a folder holding exactly one .gguf file and no safetensors weights")
        gguf_file = single
    return GGUFCheckpoint(p, gguf_file)
