"""The quantizer contract: what a quantization algorithm receives, what it yields, and what the runner does.

This module is the reference for quantizer authors; a quantizer needs adaptkit alone (no adaptkit-quant).
Nothing here imports torch at import time.

Who does what
-------------
* A **quantizer** is registered through ``adaptkit_register_quantizers`` as::

      Quantizer(name="myq", impl="my_pkg.algo:quantize", formats=("gptq",), bits=(4, 8),
                accepts=("bits", "group_size", "sym"), needs_calibration=False, params=(Param(...), ...))

  ``formats``: the core checkpoint formats its results can be written in (``adaptkit.formats.FORMATS``:
  ``gptq``, ``awq``, ``bnb-nf4``, ``bnb-int8``); the first is the one written. ``bits``: the widths it
  produces (``--bits`` outside them is refused). ``accepts``: the common ``adaptkit quantize`` options it
  honours (``adaptkit.registry.QUANT_OPTIONS``: ``bits``, ``group_size``, ``sym``, ``act_order``,
  ``damp``, ``partial_groups``); a user who sets any other one explicitly gets a one-line ``ConfigError``
  instead of a silently ignored option. ``needs_calibration``: the runner validates ``--calib``,
  ``--nsamples``, ``--seqlen`` before anything is loaded. ``params`` are method-specific options
  (``-o KEY=VALUE``), validated and defaulted before the call; they arrive in ``request.options`` (a direct
  ``run_quantize`` call fills defaults too).

* The **runner** (:func:`adaptkit.quantize.runner.run_quantize`) validates all of that, opens the input
  through the loader registry (``host.open_model``: safetensors; a GPTQ/AWQ/NF4/GGUF input only with
  ``requantize=True``, dequantized on load), decides the target linears (2-D floating-point ``*.weight``
  tensors inside ``...layers.N.``; embeddings, norms and ``lm_head`` stay in floating point), asks the
  output format whether every target can be stored (``shape_problem``), plans every output tensor, builds a
  :class:`QuantizeRequest` and calls ``impl(request)``. It packs each yielded result into the format
  (:mod:`adaptkit.formats`) and streams it to disk the moment it arrives, copies every other tensor, writes
  ``config.json`` with ``quantization_config`` and publishes the folder atomically with a model card and
  provenance (``adaptkit.json``). It drives the one progress bar (one unit per target linear).

* The **algorithm** is ``impl(request: QuantizeRequest) -> Iterable[tuple[str, item]]`` -- normally a
  generator -- yielding, **one at a time, as soon as each is ready**:

  - ``(module_name, result)`` exactly once for every name in ``request.targets`` (a linear *module* name,
    no ``.weight`` suffix, e.g. ``"model.layers.0.self_attn.q_proj"``). ``result`` is the item type of the
    output format (``adaptkit.formats.<fmt>.ITEM``): :class:`QuantizedLinear` for ``gptq``, ``awq`` and
    ``bnb-int8``; :class:`BlockwiseQuantized` for ``bnb-nf4``;
  - optionally ``(tensor_name, torch.Tensor)`` *replacing* a non-quantized tensor of the input (AWQ folds
    its scales into ``...input_layernorm.weight`` and biases). It must keep the name and shape; it is cast
    to the input tensor's dtype. A name not in the input, a target yielded twice or never, or a replacement
    of a target's weight is an error naming the quantizer.
  - Linear biases are copied from the input; an algorithm that changes one yields ``(<module>.bias, t)``.

  Streaming keeps peak memory at what the algorithm holds (GPTQ: one decoder layer plus its calibration
  activations). ``request.report("layer 3/30: ...")`` sets the progress bar's status text (never a line per
  module); the bar advances by itself for every yielded target.

Reading inputs: ``request.checkpoint`` is the open input (``adaptkit.io.Checkpoint`` interface, lazy);
``request.weight(module)`` returns the fp32 ``[out, in]`` weight of a target; ``request.config`` is the
input ``config.json`` (without ``quantization_config`` when the input was dequantized on load). Algorithms
that run the model (calibration) build it from ``request.config`` / ``request.model_dir`` and the weights of
``request.checkpoint``, get the tokenizer with ``request.tokenizer()`` and calibration token ids with
``request.calibration_ids(tokenizer)`` (``[nsamples, seqlen]`` int64, deterministic in ``seed``; the
sources are documented in :mod:`adaptkit.quantize.calib`).

Grid convention (:class:`QuantizedLinear`; see specs/formats.md)
----------------------------------------------------------------
``W_hat[o, i] = (codes[o, i] - zeros[g_idx[i], o]) * scales[g_idx[i], o]`` with codes and zeros integers in
``0 .. 2**bits - 1``. GPTQ and AWQ store scales as **fp16**, so round scales to fp16 *before* computing
codes; then ``QuantizedLinear.dequantize()`` is bit-for-bit what a loader reconstructs. GPTQ v1 stores
``zero - 1`` and cannot represent a zero point of 0 (its writer refuses one). The bitsandbytes int8 layout
is one group per row (``group_size=-1``), ``zeros == 128``, ``scale = absmax / 127``.

NF4 (:class:`BlockwiseQuantized`): the weight flattened row-major, per block of ``blocksize`` values
``W_hat = code[codes] * absmax[block]``; the ``bnb-nf4`` format packs two codes per byte and (option
``double_quant``) quantizes ``absmax`` itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Union

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from adaptkit.io import Checkpoint

SUPPORTED_BITS = (2, 3, 4, 8)
"""Bit widths the GPTQ v1 format packs (AWQ GEMM: 4 only; NF4: 4; bnb-int8: 8)."""


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize. ``group_size=-1`` means one group per output channel spanning all inputs."""

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    act_order: bool = False  #: GPTQ desc_act: process columns by decreasing Hessian diagonal; g_idx permuted
    damp: float = 0.01  #: GPTQ dampening, fraction of the mean Hessian diagonal
    true_sequential: bool = True
    static_groups: bool = False
    #: allow a shorter last group when in_features is not a multiple of group_size (GPTQ format only:
    #: ceil(in/group) groups, g_idx = i // group; GPTQModel's gptq_torch kernel reads it, vLLM's refuse)
    partial_groups: bool = False

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def n_groups(self, in_features: int) -> int:
        if self.group_size == -1:
            return 1
        return -(-in_features // self.group_size)

    def effective_group_size(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size


@dataclass
class QuantizedLinear:
    """The result of quantizing one ``nn.Linear`` weight ``W [out, in]`` on an integer grid.

    * ``codes``  integer tensor (uint8/int16/int32) ``[out, in]``, values ``0 .. 2**bits-1``, in the
      ORIGINAL column order (act-order does not permute the stored columns, only ``g_idx``);
    * ``scales`` fp32 ``[n_groups, out]`` (fp16-representable for GPTQ/AWQ, see module doc);
    * ``zeros``  int32 ``[n_groups, out]`` -- the real zero point (NOT zero-1), ``0 .. 2**bits-1``;
    * ``g_idx``  int32 ``[in]`` -- group index of each input column (``i // group_size`` without act-order).
    """

    codes: "torch.Tensor"
    scales: "torch.Tensor"
    zeros: "torch.Tensor"
    g_idx: "torch.Tensor"
    spec: QuantSpec

    @property
    def out_features(self) -> int:
        return int(self.codes.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.codes.shape[1])

    @property
    def n_groups(self) -> int:
        return int(self.scales.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """``(out_features, in_features)`` of the weight it stands for."""
        return (self.out_features, self.in_features)

    def dequantize(self) -> "torch.Tensor":
        """``W_hat [out, in]`` fp32 = ``(codes - zeros[g_idx].T) * scales[g_idx].T``."""
        import torch

        g = self.g_idx.long()
        z = self.zeros.to(torch.float32)[g].T  # [out, in]
        s = self.scales.to(torch.float32)[g].T
        return (self.codes.to(torch.float32) - z) * s

    def validate(self, name: str = "") -> None:
        """Raise ``ValueError`` (naming ``name``) if shapes/ranges are inconsistent with ``spec``. What a
        particular format cannot store (GPTQ v1: a zero point of 0) its ``pack`` refuses."""
        import torch

        where = f"{name}: " if name else ""
        if self.codes.dim() != 2:
            raise ValueError(f"{where}codes must be a 2-D [out, in] tensor, got shape {tuple(self.codes.shape)}")
        out, inn = self.codes.shape
        maxq = self.spec.maxq
        if self.codes.dtype.is_floating_point:
            raise ValueError(f"{where}codes must be an integer tensor, got {self.codes.dtype}")
        if tuple(self.scales.shape) != tuple(self.zeros.shape) or self.scales.dim() != 2 or self.scales.shape[1] != out:
            raise ValueError(
                f"{where}scales {tuple(self.scales.shape)} and zeros {tuple(self.zeros.shape)} must both be "
                f"[n_groups, {out}]"
            )
        if tuple(self.g_idx.shape) != (inn,):
            raise ValueError(f"{where}g_idx must have shape [{inn}], got {tuple(self.g_idx.shape)}")
        if out and inn:
            lo, hi = torch.aminmax(self.codes)
            if int(lo) < 0 or int(hi) > maxq:
                raise ValueError(f"{where}codes outside 0..{maxq}")
            if int(self.zeros.min()) < 0 or int(self.zeros.max()) > maxq:
                raise ValueError(f"{where}zero points outside 0..{maxq}")
            if int(self.g_idx.min()) < 0 or int(self.g_idx.max()) >= self.scales.shape[0]:
                raise ValueError(f"{where}g_idx refers to a group outside 0..{self.scales.shape[0] - 1}")
            if not torch.isfinite(self.scales).all():
                raise ValueError(f"{where}non-finite scales")


@dataclass
class BlockwiseQuantized:
    """The result of blockwise absmax quantization of one weight onto a code table (bitsandbytes NF4/FP4).

    * ``codes``  integer tensor ``[numel]``: index into ``code`` of every value of the weight flattened
      row-major (``0 .. len(code)-1``);
    * ``absmax`` fp32 ``[ceil(numel / blocksize)]``: the scale of each block of ``blocksize`` values;
    * ``code``   fp32 ``[16]``: the code table (NF4: ``adaptkit.formats.nf4.NF4_CODE``);
    * ``shape``  the weight's shape ``(out, in)``; ``quant_type``: ``"nf4"``.

    ``W_hat.flatten()[j] = code[codes[j]] * absmax[j // blocksize]``. How ``absmax`` is stored (fp32, or
    double-quantized to 8 bits) is the format's business (``-o double_quant``).
    """

    codes: "torch.Tensor"
    absmax: "torch.Tensor"
    code: "torch.Tensor"
    blocksize: int
    shape: tuple[int, ...]
    quant_type: str = "nf4"

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= int(d)
        return n

    def dequantize(self) -> "torch.Tensor":
        """fp32 ``W_hat`` of ``shape``."""
        import torch

        n = self.numel
        scale = torch.repeat_interleave(self.absmax.to(torch.float32), self.blocksize)[:n]
        return (self.code.to(torch.float32)[self.codes.reshape(-1)[:n].long()] * scale).reshape(self.shape)

    def validate(self, name: str = "") -> None:
        """Raise ``ValueError`` (naming ``name``) if shapes/ranges are inconsistent."""
        import torch

        where = f"{name}: " if name else ""
        n = self.numel
        if self.codes.dtype.is_floating_point:
            raise ValueError(f"{where}codes must be an integer tensor, got {self.codes.dtype}")
        if self.codes.numel() != n:
            raise ValueError(f"{where}codes must hold {n} values (the weight {list(self.shape)} flattened), got {self.codes.numel()}")
        nb = -(-n // self.blocksize) if self.blocksize > 0 else -1
        if self.blocksize <= 0 or tuple(self.absmax.shape) != (nb,):
            raise ValueError(f"{where}absmax must have shape [{nb}] (blocks of {self.blocksize}), got {tuple(self.absmax.shape)}")
        if n:
            lo, hi = torch.aminmax(self.codes.reshape(-1))
            if int(lo) < 0 or int(hi) >= self.code.numel():
                raise ValueError(f"{where}codes outside 0..{self.code.numel() - 1}")
        if not torch.isfinite(self.absmax).all() or bool((self.absmax < 0).any()):
            raise ValueError(f"{where}absmax must be finite and >= 0")


ProgressFn = Callable[[str], None]


@dataclass
class QuantizeRequest:
    """One ``adaptkit quantize`` run, as the algorithm sees it. Built and validated by the runner."""

    model_dir: Path
    out_dir: Path
    method: str
    spec: QuantSpec
    calib: str | None = "builtin"  #: path to a .jsonl file (``{"text": ...}`` per line) or a builtin source
    nsamples: int = 128
    seqlen: int = 512
    device: str = "cpu"
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)  #: method-specific validated Params
    targets: tuple[str, ...] = ()  #: linear module names to quantize (filled by the runner)
    progress: ProgressFn | None = None  #: receives ``report`` messages (the runner: the bar's status)
    checkpoint: "Checkpoint | None" = None  #: the open input checkpoint (filled by the runner)
    config: dict[str, Any] | None = None  #: the input config.json (without quantization_config)
    format: str = ""  #: the output format name (``adaptkit.formats.FORMATS``)
    #: seconds per phase of the algorithm (e.g. ``forward``, ``hessian``, ``solve``), filled by the algorithm if it
    #: wants; ``adaptkit quantize --json`` prints them under ``phases`` with the runner's ``pack`` and ``write``
    phases: dict[str, float] = field(default_factory=dict)

    # -- helpers for algorithms ------------------------------------------------------------------------
    def report(self, message: str) -> None:
        """Progress status (e.g. ``"layer 3/30: q_proj k_proj v_proj err=1.2e-3"``): shown on the bar."""
        if self.progress is not None:
            self.progress(message)

    def weight(self, module: str) -> "torch.Tensor":
        """fp32 ``[out, in]`` weight of linear ``module`` read from the input checkpoint."""
        import torch

        if self.checkpoint is None:
            raise RuntimeError("QuantizeRequest.checkpoint is not set")
        return self.checkpoint.get(module + ".weight").to(torch.float32)

    def tokenizer(self) -> Any:
        """The input model's tokenizer (local files only; a one-line ``CheckpointError`` if there is none).
        A checkpoint that keeps its tokenizer in another form (a GGUF file) writes the files first."""
        from adaptkit.quantize.calib import load_tokenizer

        write_aux = getattr(self.checkpoint, "write_aux", None)
        if callable(write_aux):
            import tempfile

            with tempfile.TemporaryDirectory(prefix="adaptkit-tok-") as d:
                write_aux(Path(d))
                return load_tokenizer(Path(d))
        return load_tokenizer(self.model_dir)

    def calibration_ids(self, tokenizer: Any) -> "torch.Tensor":
        """``[nsamples, seqlen]`` int64 token ids from ``calib`` (see :mod:`adaptkit.quantize.calib`)."""
        from adaptkit.quantize.calib import calibration_ids

        return calibration_ids(self, tokenizer)


QuantItem = tuple[str, Union[QuantizedLinear, BlockwiseQuantized, "torch.Tensor"]]
QuantizeImpl = Callable[[QuantizeRequest], Iterable[QuantItem]]


@dataclass
class QuantizeResult:
    """What ``run_quantize`` returns (and ``adaptkit quantize --json`` prints)."""

    out_dir: Path
    method: str
    format: str
    spec: QuantSpec
    quantized: list[str]
    passthrough: int
    bytes_in: int
    bytes_out: int
    seconds: float
    quantization_config: dict[str, Any]
    errors: dict[str, float] = field(default_factory=dict)  #: optional per-module relative errors
    timings: dict[str, float] = field(default_factory=dict)  #: seconds per phase (open, plan, quantize, publish)
    phases: dict[str, float] = field(default_factory=dict)  #: seconds inside ``quantize`` (the request's phases)
    loader: str = ""  #: qualified name of the loader that opened the input
    source_format: str | None = None  #: the input's quantized format when it was dequantized on load
    options: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {
            "out_dir": str(self.out_dir),
            "method": self.method,
            "format": self.format,
            "spec": asdict(self.spec),
            "options": dict(self.options),
            "quantized_modules": len(self.quantized),
            "passthrough_tensors": self.passthrough,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "seconds": round(self.seconds, 3),
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "phases": {k: round(v, 3) for k, v in self.phases.items()},
            "input": {"loader": self.loader, "source_format": self.source_format},
            "quantization_config": self.quantization_config,
        }
