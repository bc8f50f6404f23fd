"""The contract between the quantize driver (driver.py, format writers) and a quantization algorithm.

Who does what
-------------
* The **driver** (``adaptkit_quant.driver.run_quantize``) validates the request, opens the input checkpoint,
  decides which linear layers are quantized (``request.targets``), plans the output tensors, calls the
  algorithm, packs each result into the output *format* (GPTQ v1 or AWQ GEMM, ``formats/``) and streams it
  to disk, copies every other tensor through, writes ``config.json`` with ``quantization_config`` and
  publishes the folder atomically.
* An **algorithm** (rtn, gptq, awq; nf4 is special-cased by the driver) is registered as
  ``adaptkit.registry.Quantizer(name, impl="adaptkit_quant.<mod>:<func>", formats=("gptq",) or ("awq",))``
  and called as::

      func(request: QuantizeRequest) -> Iterable[tuple[str, QuantizedLinear | torch.Tensor]]

  It is a generator (or returns any iterable) that yields, **one at a time, as soon as each is ready**:

  - ``(module_name, QuantizedLinear)`` for every name in ``request.targets`` (a linear *module* name, no
    ``.weight`` suffix, e.g. ``"model.layers.0.self_attn.q_proj"``), exactly once each;
  - optionally ``(tensor_name, torch.Tensor)`` to *replace* a non-quantized tensor of the input checkpoint
    (AWQ folds its scales into ``model.layers.N.input_layernorm.weight`` etc.). The replacement must keep
    the name and shape; it is cast to the input tensor's dtype. A tensor name that is not in the input
    checkpoint, a target yielded twice, or a target never yielded is a driver error.
  - Linear biases are NOT yielded: the driver copies ``<module>.bias`` from the input (AWQ, which changes
    biases when folding into v->o etc., may yield a replacement ``(<module>.bias, tensor)``).

  The driver writes each item the moment it arrives, so a streaming algorithm (GPTQ: one decoder layer at a
  time) keeps peak memory at one layer plus its calibration activations. Call ``request.report(...)`` for
  per-layer progress (the CLI prints it on stderr).

* Reading inputs: ``request.checkpoint`` is an open ``adaptkit.io.Checkpoint`` (lazy, mmap) of the input;
  ``request.weight(module)`` returns the fp32 ``[out, in]`` weight of a target. Algorithms that need to run
  the model (GPTQ/AWQ calibration) load it themselves from ``request.model_dir`` (transformers,
  ``local_files_only``) and get calibration token ids via ``request.calibration_ids(tokenizer)``
  (implemented in ``adaptkit_quant.calib`` by the algorithms helper; the driver only validates the file).

* Grid convention (shared by rtn.py, gptq.py, awq.py and the format writers) -- see specs/formats.md:
  ``W_hat[o, i] = (codes[o, i] - zeros[g_idx[i], o]) * scales[g_idx[i], o]`` with codes and zeros integers in
  ``0 .. 2**bits - 1``. Scales are stored as **fp16** in both GPTQ and AWQ files, so algorithms should round
  their scales to fp16 *before* computing codes (``rtn.fp16_round``); then ``QuantizedLinear.dequantize()``
  is bit-for-bit what a loader reconstructs. ``rtn.find_params(w, bits, sym)`` / ``rtn.quantize_codes`` are
  the GPTQ-convention min/max grid helpers (range always includes 0; sym => zero = 2**(bits-1)), reusable
  by GPTQ.

* GPTQ v1 stores ``zero - 1``; a zero point of 0 is therefore stored as ``-1`` masked to ``2**bits - 1``,
  which v1 readers turn back into 2**bits (wrong). ``QuantizedLinear.validate(fmt="gptq")`` rejects zero
  == 0; ``rtn.find_params`` never produces it for asymmetric grids (it clamps the zero point to >= 1 and
  widens the scale so the range is still covered). GPTQ should use ``find_params`` too or keep zeros >= 1.

* Method options: the ``Param``s declared on the Quantizer in ``plugin.py`` (gptq: ``block_size``; awq:
  ``clip``, ``n_grid``, ``duo_scaling``; nf4: ``blocksize``, ``double_quant``, ``compute_dtype``,
  ``absmax_rounding``) are set with ``adaptkit quantize -o KEY=VALUE``, validated by the CLI, and arrive in
  ``request.options`` with defaults filled in (a direct ``driver.run_quantize`` call passes only what it is
  given, so read them with ``.get(key, default)``).

Nothing in this module imports torch at import time.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Union

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from adaptkit.io import Checkpoint

SUPPORTED_BITS = (2, 3, 4, 8)
"""Bit widths the GPTQ v1 writer packs (AWQ GEMM: 4 only)."""


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
    """The result of quantizing one ``nn.Linear`` weight ``W [out, in]``.

    * ``codes``  integer tensor (uint8/int16/int32) ``[out, in]``, values ``0 .. 2**bits-1``, in the
      ORIGINAL column order (act-order does not permute the stored columns, only ``g_idx``);
    * ``scales`` fp32 ``[n_groups, out]`` (fp16-representable, see module doc);
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

    def dequantize(self) -> "torch.Tensor":
        """``W_hat [out, in]`` fp32 = ``(codes - zeros[g_idx].T) * scales[g_idx].T``."""
        import torch

        g = self.g_idx.long()
        z = self.zeros.to(torch.float32)[g].T  # [out, in]
        s = self.scales.to(torch.float32)[g].T
        return (self.codes.to(torch.float32) - z) * s

    def validate(self, name: str = "", fmt: str = "gptq") -> None:
        """Raise ``ValueError`` (naming ``name``) if shapes/ranges are inconsistent with ``spec``/``fmt``."""
        import torch

        where = f"{name}: " if name else ""
        out, inn = self.codes.shape
        maxq = self.spec.maxq
        if self.codes.dtype.is_floating_point:
            raise ValueError(f"{where}codes must be an integer tensor, got {self.codes.dtype}")
        if tuple(self.scales.shape) != tuple(self.zeros.shape) or self.scales.shape[1] != out:
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
            lo = 1 if fmt == "gptq" else 0
            if int(self.zeros.min()) < lo or int(self.zeros.max()) > maxq:
                raise ValueError(
                    f"{where}zero points outside {lo}..{maxq}"
                    + (" (GPTQ v1 stores zero-1 and cannot represent a zero point of 0)" if fmt == "gptq" else "")
                )
            if int(self.g_idx.min()) < 0 or int(self.g_idx.max()) >= self.scales.shape[0]:
                raise ValueError(f"{where}g_idx refers to a group outside 0..{self.scales.shape[0] - 1}")
            if not torch.isfinite(self.scales).all():
                raise ValueError(f"{where}non-finite scales")


ProgressFn = Callable[[str], None]


@dataclass
class QuantizeRequest:
    """One ``adaptkit quantize`` run, as the algorithm sees it. Built and validated by the driver."""

    model_dir: Path
    out_dir: Path
    method: str
    spec: QuantSpec
    calib: str | None = "builtin"  #: path to a .jsonl file (``{"text": ...}`` per line) or "builtin"
    nsamples: int = 128
    seqlen: int = 512
    device: str = "cpu"
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)  #: method-specific validated Params
    targets: tuple[str, ...] = ()  #: linear module names to quantize (filled by the driver)
    progress: ProgressFn | None = None
    checkpoint: "Checkpoint | None" = None  #: the open input checkpoint (filled by the driver)
    config: dict[str, Any] | None = None  #: the input config.json

    # -- helpers for algorithms ------------------------------------------------------------------------
    def report(self, message: str) -> None:
        """Progress line (e.g. ``"layer 3/30: q_proj k_proj v_proj err=1.2e-3"``)."""
        if self.progress is not None:
            self.progress(message)

    def weight(self, module: str) -> "torch.Tensor":
        """fp32 ``[out, in]`` weight of linear ``module`` read from the input checkpoint."""
        import torch

        if self.checkpoint is None:
            raise RuntimeError("QuantizeRequest.checkpoint is not set")
        return self.checkpoint.get(module + ".weight").to(torch.float32)

    def calibration_ids(self, tokenizer: Any) -> "torch.Tensor":
        """``[nsamples, seqlen]`` int64 token ids from ``calib`` (see ``adaptkit_quant.calib``)."""
        from adaptkit_quant import calib  # owned by the algorithms helper

        return calib.calibration_ids(self, tokenizer)


QuantItem = tuple[str, Union[QuantizedLinear, "torch.Tensor"]]
QuantizeImpl = Callable[[QuantizeRequest], Iterable[QuantItem]]


@dataclass
class QuantizeResult:
    """What ``driver.run_quantize`` returns (and ``adaptkit quantize --json`` prints)."""

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

    def to_json(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {
            "out_dir": str(self.out_dir),
            "method": self.method,
            "format": self.format,
            "spec": asdict(self.spec),
            "quantized_modules": len(self.quantized),
            "passthrough_tensors": self.passthrough,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "seconds": round(self.seconds, 3),
            "quantization_config": self.quantization_config,
        }
