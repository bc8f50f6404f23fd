"""The contract between the train runner and a trainer plugin (SFT, DPO, KTO, ORPO, SimPO, GRPO, reward).

A trainer is registered as ``adaptkit.registry.Trainer(name=..., impl="pkg.mod:func", data_formats=...,
adapters=..., params=...)`` and called once per run as ``func(request: TrainRequest) -> TrainResult``.

Who does what
-------------
* The **runner** (:func:`adaptkit.train.runner.run_train`) resolves the trainer, checks the request against
  the trainer's declared capabilities (dataset format in ``data_formats``, adapter kind in ``adapters``,
  rewards given iff ``needs_reward``), validates ``options`` against the trainer's ``params``, checks that
  the base model is readable by a loader, opens the output with the one publisher and runs the trainer as a
  ``Step("train", name)`` through ``host.run_step``. It writes ``adaptkit.json`` (base identity: path and
  sha256 of its weight files; base quantization for QLoRA; the request; the result's metrics), the model
  card and the manifest.
* The **trainer** trains and writes its artifacts into ``request.output`` (a temporary folder that is
  published atomically only when the trainer returns): a PEFT adapter folder (``adapter_config.json`` +
  ``adapter_model.safetensors``) or a full model, plus tokenizer and chat template. It reports progress with
  ``request.report(step, total_steps, metrics)`` and returns a :class:`TrainResult`. It must not write
  outside ``request.output`` and never downloads anything (the base is a local path).

Devices: ``settings.bf16`` and ``settings.gradient_checkpointing`` are ``None`` unless the recipe sets them;
``None`` means the device default (off on CPU). Nothing in this module imports torch.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable

from adaptkit.registry import ADAPTER_KINDS, DATA_FORMATS

#: the fields each dataset row shape carries (the runner's dataset check and the trainers agree on these)
DATA_FIELDS: dict[str, tuple[str, ...]] = {
    "text": ("text",),
    "messages": ("messages",),  # [{"role": ..., "content": ...}, ...]
    "prompt_completion": ("prompt", "completion"),
    "preference": ("prompt", "chosen", "rejected"),
    "unpaired_preference": ("prompt", "completion", "label"),  # KTO: label is true/false
    "prompt": ("prompt",),  # GRPO: completions are generated and scored by rewards
}
assert set(DATA_FIELDS) == set(DATA_FORMATS)

__all__ = ["ADAPTER_KINDS", "DATA_FIELDS", "DATA_FORMATS", "AdapterSpec", "DatasetSpec", "TrainRequest",
           "TrainResult", "TrainSettings"]


@dataclass(frozen=True)
class DatasetSpec:
    """A local dataset: ``path`` (``.jsonl`` or ``.parquet``) whose rows have the fields of ``format``."""

    path: Path
    format: str
    max_rows: int | None = None


@dataclass(frozen=True)
class AdapterSpec:
    """What is trained. ``kind`` is one of :data:`ADAPTER_KINDS` (``full`` trains every weight).

    ``base_quantization`` (QLoRA): how the frozen base is quantized while training, e.g.
    ``{"quant_type": "nf4", "blocksize": 64, "double_quant": True, "compute_dtype": "bfloat16"}``; recorded
    in the artifact so that merging the adapter later reproduces the adapter-on-quantized-base model.
    """

    kind: str = "lora"
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | str = "all-linear"
    base_quantization: dict[str, Any] | None = None
    options: dict[str, Any] = field(default_factory=dict)  #: kind-specific PEFT settings (num_virtual_tokens...)


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings shared by every trainer."""

    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    learning_rate: float = 2e-4
    lr_scheduler: str = "linear"
    warmup_ratio: float = 0.0
    max_seq_len: int = 1024
    packing: bool = False
    bf16: bool | None = None  #: None: the device default (off on CPU)
    gradient_checkpointing: bool | None = None  #: None: off unless memory needs it
    eval_every: int | None = None  #: steps between evaluations on the eval split
    save_every: int | None = None  #: steps between checkpoints (for --resume); None: eval_every, else 500
    save_best: bool = True
    early_stopping_patience: int | None = None
    seed: int = 0
    report_to: tuple[str, ...] = ()  #: "tensorboard", "wandb" (offline)
    nproc: int = 1
    logging_steps: int = 1  #: steps between logged losses (``train_log.jsonl``, tensorboard)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_batch_size: int | None = None  #: None: ``batch_size``
    #: score the LM head only at label-carrying positions (same loss and gradients; off: every position,
    #: as TRL does on CPU)
    compact_lm_head: bool = True


ReportFn = Callable[[int, int, dict[str, float]], None]


@dataclass
class TrainRequest:
    """One training run as the trainer sees it (built and checked by the runner)."""

    model: Path  #: the base model: any checkpoint a loader reads (the runner checked it)
    method: str  #: the trainer's name
    train_data: DatasetSpec
    output: Path  #: the temporary output folder (published when the trainer returns)
    adapter: AdapterSpec = field(default_factory=AdapterSpec)
    settings: TrainSettings = field(default_factory=TrainSettings)
    eval_data: DatasetSpec | None = None
    rewards: tuple[str, ...] = ()  #: reward names (GRPO), resolved with ``host.rewards``
    options: dict[str, Any] = field(default_factory=dict)  #: the trainer's declared Params, defaults filled
    device: str = "cpu"
    resume_from: Path | None = None
    progress: ReportFn | None = None
    host: Any = None  #: the invocation's plugin host (``host.rewards``, ``host.open_model``)
    #: fraction of the train rows held out (seeded) as the eval split when ``eval_data`` is not given
    eval_split: float | None = None
    #: per reward name: its declared options (validated against the Reward's ``params``), passed as keywords
    reward_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    reward_weights: tuple[float, ...] | None = None  #: one weight per reward (None: all 1.0)
    #: where intermediate checkpoints go (kept across runs for ``--resume``; never inside the output). The
    #: runner fills it (``.<OUT>.adaptkit-train`` beside OUT) and removes it after a successful publish.
    checkpoint_dir: Path | None = None
    recipe: dict[str, Any] | None = None  #: the recipe as written (recorded in ``adaptkit.json``)

    def report(self, step: int, total_steps: int, metrics: dict[str, float] | None = None) -> None:
        """Progress: the runner shows one bar (step, loss, tokens/s, ETA)."""
        if self.progress is not None:
            self.progress(step, total_steps, dict(metrics or {}))

    def describe(self) -> dict[str, Any]:
        """JSON-able record of the request (goes into ``adaptkit.json``)."""
        skip = ("progress", "host", "output", "recipe", "checkpoint_dir")
        return _jsonable({f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip})


@dataclass
class TrainResult:
    """What a trainer returns: final metrics and the artifacts it wrote (paths relative to the output)."""

    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)  #: e.g. {"adapter": ".", "tokenizer": "."}
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    best_checkpoint: str | None = None
    #: the base quantization actually used (QLoRA: quant_type, blocksize, double_quant, compute_dtype); the
    #: runner records it in ``adaptkit.json`` (falling back to ``request.adapter.base_quantization``)
    base_quantization: dict[str, Any] | None = None
    versions: dict[str, str] = field(default_factory=dict)  #: library versions that trained it (trl, peft...)
    warnings: list[str] = field(default_factory=list)  #: one-line warnings the trainer gave (pad == eos, ...)

    def to_json(self) -> dict[str, Any]:
        return _jsonable(asdict(self))


def _jsonable(x: Any) -> Any:
    if is_dataclass(x) and not isinstance(x, type):
        return _jsonable(asdict(x))
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x
