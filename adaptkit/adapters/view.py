"""``AdaptedCheckpoint``: a base checkpoint with PEFT adapters merged in, seen as one checkpoint.

The view has the ``adaptkit.io.Checkpoint`` interface (``names``, ``info``, ``get``, ``config``, ``files``,
``path``, ``close``, ...). Opening it validates every adapter against the base (names, shapes, dtypes) and
reads no tensor data; ``get(name)`` then computes one merged tensor at a time, in fp32, and rounds it once to
the output dtype (``get_fp32`` skips the rounding). Memory: one base tensor and one adapter module at a time.

Per base tensor ``W`` (stored layout), adapters are applied in the order given, each with its weight ``w``:

* LoRA / rsLoRA:   ``W += w * s * B @ A`` (``s = alpha/r`` or ``alpha/sqrt(r)``, per-module ``rank_pattern`` /
  ``alpha_pattern``; transposed for ``fan_in_fan_out`` and embeddings); ``lora_bias``: ``b += w * s * b_B``;
* DoRA:            ``W = m / ||W0 + dW|| * (W + dW)`` with ``dW = w * s * B @ A`` and ``W0`` the unmerged base;
* IA3:             ``W *= l`` (rows, or columns for feedforward modules); ``b *= l`` for non-feedforward ones;
* full copies (``modules_to_save``, trained biases): ``W = W + w * (S - W)`` (``S`` when ``w = 1``).

With a QLoRA policy (:mod:`adaptkit.adapters.qlora`) every linear weight of the base is first round-tripped
through the quantization the adapter was trained on. Formulas and references: specs/adapters.md.

Opening adapter references for ``adaptkit merge`` configs: :func:`open_reference` accepts mergekit's
``"BASE+ADAPTER"`` strings and ``(base, [adapters])``.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from adaptkit.adapters import qlora
from adaptkit.errors import CheckpointError, ConfigError
from adaptkit.formats.peft import IA3Module, LoraModule, PeftAdapter, read_adapter
from adaptkit.io.checkpoint import TensorIndex

if TYPE_CHECKING:  # pragma: no cover
    import torch

_FLOAT_CODES = ("F64", "F32", "F16", "BF16")
_DTYPE_CODES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64"}


class _Op:
    """One change to one base tensor: ``kind`` lora | dora | ia3 | ia3_bias | lora_bias | replace."""

    __slots__ = ("kind", "adapter", "module", "key", "weight")

    def __init__(self, kind: str, adapter: int, module: Any = None, key: str | None = None, weight: float = 1.0):
        self.kind = kind
        self.adapter = adapter
        self.module = module
        self.key = key
        self.weight = weight


def dtype_code_of(dtype: Any) -> str | None:
    """``"float32"``/``torch.bfloat16``/``"auto"``/None -> safetensors code (None: keep the base's)."""
    if dtype is None or str(dtype) in ("", "auto"):
        return None
    name = str(dtype).removeprefix("torch.").lower()
    name = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}.get(name, name)
    if name not in _DTYPE_CODES:
        raise ConfigError(f"--dtype {dtype!r}: expected auto, float32, bfloat16 or float16")
    return _DTYPE_CODES[name]


class AdaptedCheckpoint(TensorIndex):
    """``base`` (an opened checkpoint) with ``adapters`` (PEFT folders or parsed :class:`PeftAdapter`) merged.

    ``weights``: one float per adapter (default 1.0). ``base_quantization``: a
    :class:`~adaptkit.adapters.qlora.BaseQuantization` to force (``qlora.NONE`` turns the QLoRA round trip
    off), or None to use what the adapters record. ``dtype``: output dtype of floating tensors (None: each
    base tensor's own). ``device``: where the math runs. ``close_base``: close ``base`` with the view.
    Raises ``CheckpointError`` when an adapter does not fit the base and ``ConfigError`` for bad settings.
    """

    def __init__(self, base: Any, adapters: Sequence[Any], weights: Sequence[float] | None = None, *,
                 base_quantization: "qlora.BaseQuantization | None" = None, dtype: Any = None,
                 device: str = "cpu", close_base: bool = False) -> None:
        self.base = base
        self.device = device
        self._close_base = close_base
        self._owned: list[PeftAdapter] = []
        try:
            self.adapters: list[PeftAdapter] = []
            for a in adapters:
                if isinstance(a, PeftAdapter):
                    self.adapters.append(a)
                else:
                    ad = read_adapter(a)
                    self._owned.append(ad)
                    self.adapters.append(ad)
            if not self.adapters:
                raise ConfigError("no adapter given")
            if weights is None:
                weights = [1.0] * len(self.adapters)
            weights = [float(w) for w in weights]
            if len(weights) != len(self.adapters):
                raise ConfigError(f"--weights: {len(weights)} weight(s) for {len(self.adapters)} adapter(s); give one per adapter")
            self.weights = weights
            self._out_code = dtype_code_of(dtype)
            self.notes: list[str] = []
            self._plan()
            self.policy = qlora.resolve_policy(self.adapters, base_quantization)
            self._plan_roundtrip()
        except BaseException:
            self._close_owned()
            raise

    # -- planning (headers only) -----------------------------------------------------------------------
    def _base_info(self, name: str) -> Any:
        return self.base.info(name)

    def _missing(self, ad: PeftAdapter, module: str, tensor: str) -> CheckpointError:
        close = difflib.get_close_matches(tensor, self._names, n=1, cutoff=0.6)
        near = f" (nearest base tensor: {close[0]})" if close else ""
        return CheckpointError(
            f"{ad.weights_path}: adapter module {module!r} has no tensor {tensor!r} in base {self.base.path}"
            f"{near}; the adapter was made for another model")

    def _shape_error(self, ad: PeftAdapter, what: str, want: tuple[int, ...], name: str, have: tuple[int, ...]) -> CheckpointError:
        return CheckpointError(
            f"{ad.weights_path}: {what} needs {name} of shape {list(want)}, but base {self.base.path} has "
            f"{list(have)}; the adapter was made for another base")

    def _plan(self) -> None:
        self._names = list(self.base.names())
        names = set(self._names)
        self._ops: dict[str, list[_Op]] = {}
        cfg = getattr(self.base, "config", None) or {}
        for i, ad in enumerate(self.adapters):
            w = self.weights[i]
            ffo = ad.fan_in_fan_out
            for tname, key in ad.replacements.items():
                if tname not in names:
                    if tname == "lm_head.weight" and cfg.get("tie_word_embeddings", False):
                        raise CheckpointError(
                            f"{ad.weights_path}: the adapter saves a trained lm_head, but base {self.base.path} ties "
                            "lm_head to the input embeddings (tie_word_embeddings); untie the base first")
                    raise self._missing(ad, tname.rsplit(".", 1)[0], tname)
                have = tuple(self._base_info(tname).shape)
                if tuple(ad.shape(key)) != have:
                    raise self._shape_error(ad, f"saved tensor {key}", tuple(ad.shape(key)), tname, have)
                self._ops.setdefault(tname, []).append(_Op("replace", i, key=key, weight=w))
            for mod in ad.modules.values():
                tname = mod.weight_name
                if tname not in names:
                    if mod.name == "lm_head" and cfg.get("tie_word_embeddings", False):
                        raise CheckpointError(
                            f"{ad.weights_path}: the adapter changes lm_head, but base {self.base.path} ties lm_head "
                            "to the input embeddings (tie_word_embeddings); untie the base first")
                    raise self._missing(ad, mod.name, tname)
                info = self._base_info(tname)
                have = tuple(info.shape)
                if info.dtype not in _FLOAT_CODES:
                    raise CheckpointError(f"base {self.base.path}: {tname} is {info.dtype}, not a floating-point weight "
                                          f"the adapter {ad.path} can be merged into")
                if isinstance(mod, LoraModule):
                    r_a = ad.shape(mod.a_key)
                    r_b = ad.shape(mod.b_key)
                    if mod.kind == "embedding":
                        want = (r_a[1], r_b[0])
                    else:
                        want = (r_a[1], r_b[0]) if ffo else (r_b[0], r_a[1])
                    if have != want:
                        raise self._shape_error(ad, f"LoRA of {mod.name} (B {list(r_b)} x A {list(r_a)})", want, tname, have)
                    self._ops.setdefault(tname, []).append(_Op("dora" if mod.magnitude_key else "lora", i, mod, weight=w))
                    if mod.bias_key:
                        bname = f"{mod.name}.bias"
                        if bname not in names:
                            raise CheckpointError(f"{ad.weights_path}: {mod.name} has a lora_B bias (lora_bias) but base "
                                                  f"{self.base.path} has no {bname}")
                        self._ops.setdefault(bname, []).append(_Op("lora_bias", i, mod, weight=w))
                else:
                    assert isinstance(mod, IA3Module)
                    if w != 1.0:
                        raise ConfigError(f"{ad.path}: IA3 scales weights multiplicatively and has no weighted merge; "
                                          f"give it weight 1 (got {w})")
                    n = ad.shape(mod.key)
                    ax = (0 if ffo else 1) if mod.feedforward else (1 if ffo else 0)
                    size = n[1] if mod.feedforward else n[0]
                    if len(have) != 2 or have[ax] != size:
                        what = "input" if mod.feedforward else "output"
                        raise CheckpointError(
                            f"{ad.weights_path}: IA3 vector of {mod.name} has {size} entries but base {self.base.path} "
                            f"{tname} {list(have)} has {have[ax] if len(have) > ax else '?'} {what} features; "
                            "the adapter was made for another base")
                    self._ops.setdefault(tname, []).append(_Op("ia3", i, mod))
                    bname = f"{mod.name}.bias"
                    if not mod.feedforward and bname in names:
                        self._ops.setdefault(bname, []).append(_Op("ia3_bias", i, mod))
        self._infos: dict[str, Any] = {}
        from adaptkit.io import TensorInfo
        from adaptkit.io.dtypes import ITEMSIZE, shape_numel

        for n in self._names:
            info = self._base_info(n)
            code = info.dtype
            if self._out_code and code in _FLOAT_CODES:
                code = self._out_code
            self._infos[n] = TensorInfo(n, code, tuple(info.shape), info.file, -1,
                                        shape_numel(tuple(info.shape)) * ITEMSIZE[code])

    def _plan_roundtrip(self) -> None:
        self._roundtrip: set[str] = set()
        if not self.policy.active:
            return
        src = getattr(self.base, "source_format", None)
        if qlora.already_quantized(src, self.policy):
            self.notes.append(f"base is stored as {src}: its dequantized weights already are the {self.policy.quant_type} "
                              "weights the adapter was trained on (no second round trip)")
            return
        names = set(self._names)
        tied = qlora.default_tied(getattr(self.base, "config", None), names)
        for n in self._names:
            info = self._infos[n]
            if self.base.info(n).dtype in _FLOAT_CODES and qlora.quantized_by_bnb(n, tuple(info.shape), self.policy, tied):
                self._roundtrip.add(n)
        if not self._roundtrip:
            self.notes.append(f"{self.policy.quant_type} policy: no linear weight found to round-trip")

    # -- Checkpoint interface --------------------------------------------------------------------------
    @property
    def path(self) -> Path:
        return Path(self.base.path)

    @property
    def files(self) -> list[Path]:
        """The base's weight files, then each adapter's ``adapter_model.safetensors``."""
        return [*map(Path, self.base.files), *[a.weights_path for a in self.adapters]]

    @property
    def source_format(self) -> str | None:
        return getattr(self.base, "source_format", None)

    @property
    def loader(self) -> str:
        return getattr(self.base, "loader", "adaptkit:safetensors")

    @property
    def config(self) -> dict | None:
        cfg = getattr(self.base, "config", None)
        if cfg is None:
            return None
        cfg = dict(cfg)
        cfg.pop("quantization_config", None)
        if self._out_code:
            name = {v: k for k, v in _DTYPE_CODES.items()}[self._out_code]
            cfg["torch_dtype"] = name
            if "dtype" in cfg:
                cfg["dtype"] = name
        return cfg

    @property
    def metadata(self) -> dict[str, str] | None:
        return getattr(self.base, "metadata", None)

    def _order(self) -> Any:
        return self._names

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self._infos.values())

    def changed(self) -> list[str]:
        """Names of the tensors the adapters (or the QLoRA round trip) change."""
        return [n for n in self._names if n in self._ops or n in self._roundtrip]

    def _read(self, name: str) -> "torch.Tensor":
        try:
            return self.base.get(name, copy=True)  # preadv: no mapping left resident
        except TypeError:
            return self.base.get(name)

    def get(self, name: str, *, copy: bool = False) -> "torch.Tensor":
        """The merged tensor ``name``, computed in fp32 and rounded once to the output dtype (on the CPU)."""
        import torch

        from adaptkit.io.dtypes import torch_dtype

        info = self.info(name)
        if name not in self._ops and name not in self._roundtrip:
            t = self._read(name) if copy else self.base.get(name)
            want = torch_dtype(info.dtype)
            return t if t.dtype == want else t.to(want)
        ops = self._ops.get(name, ())
        if name not in self._roundtrip and ops and all(op.kind == "lora" for op in ops):
            return self._lora_blocked(name, ops, torch_dtype(info.dtype))
        w = self.get_fp32(name)
        return w.to(torch_dtype(info.dtype)).cpu()

    #: elements per row block of the fused LoRA path (1 MiB of fp32: the block stays in cache)
    BLOCK_ELEMENTS = 1 << 18

    def _lora_blocked(self, name: str, ops: Sequence[_Op], out_dtype: Any) -> "torch.Tensor":
        """Plain LoRA deltas only: the same fp32 arithmetic as :meth:`get_fp32` (``W + (B @ A) * s`` per
        adapter, rounded once), done in row blocks so no full-size fp32 temporary is made."""
        import torch

        raw = self._read(name)
        if not raw.is_floating_point():  # pragma: no cover - planning refuses non-float targets
            return raw
        cdt = torch.float64 if raw.dtype == torch.float64 else torch.float32
        factors = []
        for op in ops:
            ad, mod = self.adapters[op.adapter], op.module
            a, b = self._t(ad, mod.a_key, cdt), self._t(ad, mod.b_key, cdt)
            if mod.kind == "embedding" or ad.fan_in_fan_out:  # stored rows of (B @ A)^T are A[:, rows]^T @ B^T
                factors.append((a.T, b.T, mod.scaling * op.weight))
            else:
                factors.append((b, a, mod.scaling * op.weight))
        rows = raw.shape[0]
        cols = raw.numel() // max(rows, 1)
        step = max(1, self.BLOCK_ELEMENTS // max(cols, 1))
        src = raw.to(self.device) if self.device != "cpu" else raw
        out = torch.empty(raw.shape, dtype=out_dtype, device=src.device)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            acc = src[r0:r1].to(cdt, copy=True)
            for left, right, scale in factors:
                d = left[r0:r1] @ right
                d.mul_(scale)
                acc.add_(d)
            out[r0:r1] = acc
        return out.cpu()

    def get_fp32(self, name: str) -> "torch.Tensor":
        """The merged tensor in fp32 (fp64 for an fp64 base tensor) on the view's device, not rounded."""
        import torch

        self.info(name)
        raw = self._read(name)
        if not raw.is_floating_point():
            return raw
        cdt = torch.float64 if raw.dtype == torch.float64 else torch.float32
        if name in self._roundtrip:
            w0 = qlora.roundtrip(raw, self.policy, device=self.device).to(cdt)
        else:
            w0 = raw.to(device=self.device, dtype=cdt)
            if w0.data_ptr() == raw.data_ptr():
                w0 = w0.clone()
        ops = self._ops.get(name, ())
        needs_w0 = any(op.kind == "dora" for op in ops)
        w = w0.clone() if needs_w0 else w0
        for op in ops:
            w = self._apply(op, w, w0, cdt)
        return w

    def _t(self, ad: PeftAdapter, key: str, cdt: Any) -> "torch.Tensor":
        return ad.get(key).to(device=self.device, dtype=cdt)

    def _apply(self, op: _Op, w: "torch.Tensor", w0: "torch.Tensor", cdt: Any) -> "torch.Tensor":
        from adaptkit.adapters import math as am

        ad = self.adapters[op.adapter]
        mod = op.module
        if op.kind == "replace":
            s = self._t(ad, op.key, cdt)
            return s.clone() if op.weight == 1.0 else w.add_(s - w, alpha=op.weight)
        if op.kind in ("lora", "dora"):
            emb = mod.kind == "embedding"
            delta = am.lora_delta(self._t(ad, mod.a_key, cdt), self._t(ad, mod.b_key, cdt), mod.scaling * op.weight,
                                  transpose=emb or ad.fan_in_fan_out)
            if op.kind == "lora":
                return w.add_(delta)
            norm_dim = 0 if (emb or ad.fan_in_fan_out) else 1
            return am.dora_merge(w, w0, delta, self._t(ad, mod.magnitude_key, cdt), norm_dim=norm_dim)
        if op.kind == "lora_bias":
            return w.add_(self._t(ad, mod.bias_key, cdt), alpha=mod.scaling * op.weight)
        if op.kind == "ia3":
            return w.mul_(self._t(ad, mod.key, cdt).T if ad.fan_in_fan_out else self._t(ad, mod.key, cdt))
        if op.kind == "ia3_bias":
            return w.mul_(self._t(ad, mod.key, cdt).reshape(w.shape))
        raise AssertionError(op.kind)  # pragma: no cover

    # -- the torch-free path (merge-adapter's writer) -----------------------------------------------------
    def _plain_file(self, info: Any) -> bool:
        from adaptkit.io.checkpoint import Checkpoint

        return (type(self.base) is Checkpoint and getattr(self.base, "source_format", None) is None
                and info.offset >= 0 and self.device == "cpu")

    def _pread(self, path: Path, offset: int, nbytes: int) -> Any:
        """``nbytes`` at ``offset`` of ``path`` into a fresh numpy uint8 array (pread: nothing stays mapped)."""
        import os

        import numpy as np

        fds = self.__dict__.setdefault("_fds", {})
        fd = fds.get(path)
        if fd is None:
            fd = fds[path] = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        buf = np.empty(nbytes, dtype=np.uint8)
        mv = memoryview(buf)
        done = 0
        while done < nbytes:
            k = os.preadv(fd, [mv[done: done + (1 << 30)]], offset + done)
            if k <= 0:
                raise CheckpointError(f"{path}: file shrank while reading")
            done += k
        return buf

    def _np_tensor(self, info: Any) -> Any:
        """A stored tensor as a float32 numpy array of its shape (F32/BF16/F16), or None."""
        from adaptkit.adapters import npfloat

        if info.dtype not in npfloat.CODES:
            return None
        raw = self._pread(Path(info.file), info.offset, info.nbytes)
        return npfloat.decode(raw, info.dtype).reshape(info.shape)

    def fast_bytes(self, name: str) -> Any:
        """The merged tensor ``name`` as little-endian bytes of ``info(name).dtype`` (a numpy uint8 array),
        computed with numpy -- the same fp32 arithmetic as :meth:`get` (``W + (B @ A) * s`` per LoRA, full
        copies, one round-to-nearest-even), without importing torch. None when the tensor needs :meth:`get` (a
        base read through a dequantizing loader, a QLoRA round trip, DoRA, IA3, lora_bias, another device, F64)."""
        import numpy as np

        from adaptkit.adapters import npfloat

        info = self.base.info(name)
        out_code = self.info(name).dtype
        if not self._plain_file(info) or name in self._roundtrip:
            return None
        ops = self._ops.get(name, ())
        if not ops:
            if out_code == info.dtype:
                return self._pread(Path(info.file), info.offset, info.nbytes)
            if info.dtype not in npfloat.CODES or out_code not in npfloat.CODES:
                return None
            return npfloat.encode(self._np_tensor(info), out_code)
        if any(op.kind not in ("lora", "replace") for op in ops) or info.dtype not in npfloat.CODES \
                or out_code not in npfloat.CODES or len(info.shape) < 1:
            return None
        steps: list[tuple[Any, ...]] = []
        for op in ops:
            ad, mod = self.adapters[op.adapter], op.module
            if op.kind == "replace":
                full = self._np_tensor(ad.file.infos[op.key])
                if full is None:
                    return None
                steps.append(("replace", full.reshape(info.shape[0], -1), np.float32(op.weight)))
                continue
            a, b = self._np_tensor(ad.file.infos[mod.a_key]), self._np_tensor(ad.file.infos[mod.b_key])
            if a is None or b is None:
                return None
            scale = np.float32(mod.scaling * op.weight)
            if mod.kind == "embedding" or ad.fan_in_fan_out:  # stored rows of (B @ A)^T are A[:, rows]^T @ B^T
                steps.append(("lora", np.ascontiguousarray(a.T), np.ascontiguousarray(b.T), scale))
            else:
                steps.append(("lora", b, a, scale))
        w = self._pread(Path(info.file), info.offset, info.nbytes)
        rows = info.shape[0]
        cols = info.numel // max(rows, 1)
        step = max(1, self.BLOCK_ELEMENTS // max(cols, 1))
        out_item = {"F32": 4, "BF16": 2, "F16": 2}[out_code]
        in_item = {"F32": 4, "BF16": 2, "F16": 2}[info.dtype]
        out = np.empty(info.numel * out_item, dtype=np.uint8)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            acc = npfloat.decode(w[r0 * cols * in_item: r1 * cols * in_item], info.dtype).reshape(r1 - r0, cols)
            for step_ in steps:
                if step_[0] == "lora":
                    _, left, right, scale = step_
                    d = left[r0:r1] @ right
                    d *= scale
                    acc += d
                else:
                    _, full, wt = step_
                    if wt == 1.0:
                        acc = full[r0:r1].copy()
                    else:
                        acc += wt * (full[r0:r1] - acc)
            out[r0 * cols * out_item: r1 * cols * out_item] = npfloat.encode(acc, out_code)
        return out

    # -- reporting -------------------------------------------------------------------------------------
    def identity(self, *, hash_files: bool = True) -> dict[str, Any]:
        """Provenance of the view: the base (path, loader, sha256 of its weight files), each adapter (path,
        type, ranks, sha256 of its weights) with its weight, and the QLoRA policy."""
        from adaptkit.io.publish import file_sha256

        base = {"path": str(self.base.path), "loader": self.loader, "source_format": self.source_format}
        if hash_files:
            base["sha256"] = file_sha256(list(self.base.files))
        ads = []
        for ad, w in zip(self.adapters, self.weights):
            d = {"path": str(ad.path), "weight": w, "peft_type": ad.peft_type, "kind": ad.kind, "ranks": ad.ranks,
                 "base_model_name_or_path": ad.base_name, "modules": len(ad.modules)}
            if hash_files:
                d["sha256"] = file_sha256([ad.weights_path])[ad.weights_path.name]
            ads.append(d)
        return {"base": base, "adapters": ads, "base_quantization": self.policy.describe(),
                "base_quantization_applied": bool(self._roundtrip), "roundtrip_tensors": len(self._roundtrip)}

    def base_hash_notes(self, base_sha: dict[str, str]) -> list[str]:
        """Warnings for adapters whose recorded base (adaptkit.json sha256) differs from this base."""
        out = []
        for ad in self.adapters:
            rec = ad.base_sha256
            if rec and base_sha and rec != base_sha:
                out.append(f"{ad.path}: adaptkit.json records a base with other weight files "
                           f"(sha256 {sorted(rec.values())[0][:12]}...) than {self.base.path}")
        return out

    def write_aux(self, dst: Any, *, config: bool = False) -> list[str]:
        """Tokenizer / chat template / generation config of the base (``Publication.copy_aux`` calls this)."""
        write_aux = getattr(self.base, "write_aux", None)
        if callable(write_aux):
            return list(write_aux(dst, config=config))
        from adaptkit.io import copy_aux_files

        return copy_aux_files(self.base.path, dst, config=config)

    # -- closing ---------------------------------------------------------------------------------------
    def _close_owned(self) -> None:
        for a in self._owned:
            a.close()
        self._owned = []

    def close(self) -> None:
        import os

        for fd in self.__dict__.pop("_fds", {}).values():
            os.close(fd)
        self._close_owned()
        if self._close_base:
            self.base.close()

    def __enter__(self) -> "AdaptedCheckpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"AdaptedCheckpoint({str(self.base.path)!r} + {len(self.adapters)} adapter(s), "
                f"{len(self.changed())} tensors changed)")


def split_reference(ref: str) -> tuple[str, list[str]]:
    """mergekit's adapter reference ``"BASE+ADAPTER[+ADAPTER...]"`` -> (base, [adapters]). A path that exists
    as written (it may contain ``+``) is a plain model reference."""
    if Path(ref).exists() or "+" not in ref:
        return ref, []
    parts = ref.split("+")
    for i in range(len(parts) - 1, 0, -1):  # longest existing base prefix wins ("a+b" folders)
        base = "+".join(parts[:i])
        if Path(base).exists():
            rest = parts[i:]
            return base, rest
    return parts[0], parts[1:]


def open_reference(host: Any, ref: Any, adapters: Sequence[Any] = (), weights: Sequence[float] | None = None,
                   **options: Any) -> Any:
    """Open a model reference that may carry adapters, for ``adaptkit merge`` configs and other commands.

    ``ref``: a path or ``"BASE+ADAPTER"`` (mergekit's string form); ``adapters``: more adapter folders (the
    ``model: {model: {path: BASE, lora: ADAPTER}}`` form). Without adapters this is ``host.open_model(ref)``;
    with them an :class:`AdaptedCheckpoint` that owns (and closes) the opened base. ``options`` go to the view
    (``dtype``, ``device``, ``base_quantization``).
    """
    base_ref, more = split_reference(str(ref))
    all_adapters = [*more, *adapters]
    base = host.open_model(base_ref)
    if not all_adapters:
        return base
    try:
        return AdaptedCheckpoint(base, all_adapters, weights, close_base=True, **options)
    except BaseException:
        base.close()
        raise
