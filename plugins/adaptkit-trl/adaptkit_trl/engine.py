"""What every adaptkit-trl trainer shares: per-device defaults, TrainingArguments, callbacks, guards, artifact.

Traps handled here (measured with TRL 1.16 / transformers 5.24 on CPU):

* every TRL config defaults to ``bf16=True`` (fails on CPU) and ``gradient_checkpointing=True`` (-28 %
  tokens/s when memory does not need it; breaks prefix tuning): both are set explicitly from the recipe, off
  on CPU unless asked, bf16 on a GPU that supports it, gradient checkpointing never unless asked;
* a loss that trains on nothing (assistant-only loss without usable assistant masks, completions truncated
  away): the label-carrying tokens of the first batches are counted before training; none is an error;
* pad == eos: a warning (collators that mask padding by token id also mask EOS out of the loss);
* library versions outside the supported ranges: an error naming the package (``versions.py``);
* TRL's fused LM head projects only the label-carrying positions on Triton devices but every position on
  CPU (its fallback keeps tile shapes fixed for compilers); with completion-only loss most positions carry no
  label, so ``compact_lm_head`` (default on) takes the compact path on CPU too: the same loss and gradients
  for a fraction of the LM-head work.

Checkpoints (for ``--resume`` and the best-checkpoint selection) go to ``request.checkpoint_dir``, never into
the output; the output gets the adapter or model (safetensors), tokenizer, chat template, ``train_log.jsonl``
and, with ``report_to: tensorboard``, event files under ``runs/``.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from adaptkit.errors import AdaptkitError, ConfigError
from adaptkit.train.api import TrainRequest, TrainResult

#: batches whose label-carrying tokens are counted before training
GUARD_BATCHES = 4


@dataclass
class Context:
    """Resolved per-run settings."""

    request: TrainRequest
    device: str
    bf16: bool
    gradient_checkpointing: bool
    rank: int = 0
    world_size: int = 1
    warnings: list[str] = field(default_factory=list)
    base_quantization: dict[str, Any] | None = None

    def warn(self, message: str) -> None:
        """A one-line warning on stderr (rank 0), also recorded in the result."""
        line = " ".join(message.split())
        if line not in self.warnings:
            self.warnings.append(line)
            if self.rank == 0:
                print(f"warning: {line}", file=sys.stderr, flush=True)


def quiet_libraries() -> None:
    """No tqdm bars or info logs from datasets/transformers/TRL: adaptkit shows one progress bar."""
    import logging

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for name in ("trl", "peft", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning, module=r"(trl|transformers|peft|torch|accelerate)\b.*")
    warnings.filterwarnings("ignore", category=FutureWarning)


def prepare(request: TrainRequest) -> Context:
    """Version check, quiet libraries, seeds, device and precision defaults."""
    from adaptkit.train.runner import process_rank

    from adaptkit_trl.models import resolve_device
    from adaptkit_trl.versions import check_versions

    rank, world = process_rank()
    ctx = Context(request=request, device="cpu", bf16=False, gradient_checkpointing=False, rank=rank,
                  world_size=world)
    check_versions(warn=ctx.warn)
    quiet_libraries()
    import torch
    from transformers import set_seed

    ctx.device = resolve_device(request.device)
    s = request.settings
    on_gpu = ctx.device.startswith("cuda")
    if s.bf16 and not on_gpu:
        ctx.warn("bf16 on CPU: mixed precision is emulated and usually slower than float32")
    ctx.bf16 = bool(s.bf16) if s.bf16 is not None else bool(on_gpu and torch.cuda.is_bf16_supported())
    ctx.gradient_checkpointing = bool(s.gradient_checkpointing)
    if ctx.gradient_checkpointing and request.adapter.kind == "prefix_tuning":
        raise ConfigError("gradient_checkpointing does not work with prefix_tuning (the prefix cache is not "
                          "recomputed); set training.gradient_checkpointing: false")
    set_seed(s.seed)
    return ctx


def estimate_steps(request: TrainRequest, n_rows: int, world: int) -> int:
    s = request.settings
    if s.max_steps:
        return int(s.max_steps)
    per_epoch = math.ceil(math.ceil(n_rows / (s.batch_size * max(1, world))) / s.grad_accum)
    return max(1, int(math.ceil(per_epoch * s.epochs)))


def config_kwargs(ctx: Context, has_eval: bool) -> dict[str, Any]:
    """TrainingArguments fields every method shares."""
    r = ctx.request
    s = r.settings
    ckpt = Path(r.checkpoint_dir) if r.checkpoint_dir is not None else Path(r.output) / ".checkpoints"
    report = [b for b in s.report_to if b != "tensorboard"]  # tensorboard: our own callback writes into OUT
    if "wandb" in report:
        os.environ["WANDB_MODE"] = "offline"
        os.environ.setdefault("WANDB_DIR", str(r.output))
    kw: dict[str, Any] = dict(
        output_dir=str(ckpt), seed=s.seed, data_seed=s.seed,
        per_device_train_batch_size=s.batch_size, per_device_eval_batch_size=s.eval_batch_size or s.batch_size,
        gradient_accumulation_steps=s.grad_accum, learning_rate=s.learning_rate, lr_scheduler_type=s.lr_scheduler,
        warmup_steps=float(s.warmup_ratio), weight_decay=s.weight_decay, max_grad_norm=s.max_grad_norm,
        num_train_epochs=s.epochs, max_steps=s.max_steps if s.max_steps else -1,
        bf16=ctx.bf16, fp16=False, gradient_checkpointing=ctx.gradient_checkpointing,
        use_cpu=not ctx.device.startswith("cuda"), logging_steps=s.logging_steps, logging_first_step=True,
        report_to=report or "none", disable_tqdm=True, dataloader_num_workers=0,
        dataloader_pin_memory=ctx.device.startswith("cuda"), save_total_limit=2, remove_unused_columns=True,
    )
    if ctx.gradient_checkpointing:
        kw["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    if ctx.world_size > 1:
        kw["ddp_backend"] = "nccl" if ctx.device.startswith("cuda") else "gloo"
        kw["ddp_find_unused_parameters"] = False
    if has_eval and s.eval_every:
        save = s.save_every or s.eval_every
        if save % s.eval_every:
            raise ConfigError(f"training.save_every ({save}) must be a multiple of training.eval_every "
                              f"({s.eval_every}) so the best evaluated checkpoint is kept")
        kw.update(eval_strategy="steps", eval_steps=s.eval_every, save_strategy="steps", save_steps=save,
                  load_best_model_at_end=bool(s.save_best or s.early_stopping_patience),
                  metric_for_best_model="eval_loss", greater_is_better=False)
    else:
        kw.update(eval_strategy="no", save_strategy="steps", save_steps=s.save_every or 500)
    return kw


def make_args(cls: type, ctx: Context, has_eval: bool, **method_kwargs: Any) -> Any:
    import dataclasses

    kw = config_kwargs(ctx, has_eval)
    kw.update(method_kwargs)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(kw) - names)
    if unknown:  # a setting this TRL version does not have would be silently ignored: refuse instead
        raise ConfigError(f"{cls.__name__} of the installed TRL has no field(s) {', '.join(unknown)} "
                          "(adaptkit-trl and TRL versions disagree)")
    try:
        return cls(**kw)
    except ValueError as exc:
        raise ConfigError(f"training settings: {' '.join(str(exc).split())[:300]}") from None


# -- counting and progress ------------------------------------------------------------------------------------

def batch_tokens(inputs: Any) -> int:
    """Non-padding tokens the model reads in one training batch (any TRL trainer's batch layout)."""
    if not isinstance(inputs, dict):
        return 0

    def msum(key: str) -> int:
        v = inputs.get(key)
        return int(v.sum().item()) if v is not None and hasattr(v, "sum") else 0

    if "attention_mask" in inputs:
        return msum("attention_mask") + msum("KL_attention_mask")
    if "chosen_attention_mask" in inputs:
        return msum("chosen_attention_mask") + msum("rejected_attention_mask")
    if "completion_mask" in inputs and "prompt_mask" in inputs:  # GRPO
        return msum("prompt_mask") + msum("completion_mask")
    ids = inputs.get("input_ids")  # padding-free / packed: documents back to back, padded at the end
    if ids is None or not hasattr(ids, "numel"):
        return 0
    pos = inputs.get("position_ids")
    if pos is not None and hasattr(pos, "ne") and pos.dim() == 2:
        # padding comes last, each pad at position 0: a row's real tokens end at its last non-zero position
        total = 0
        for row in pos:
            nz = row.ne(0).nonzero()
            total += int(nz.max().item()) + 1 if nz.numel() else 0
        return total
    return int(ids.numel())


def counted(cls: type) -> type:
    """``cls`` with a token counter in ``training_step`` (``self.adaptkit_tokens``)."""

    class Counted(cls):  # type: ignore[misc, valid-type]
        adaptkit_tokens = 0

        def training_step(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
            self.adaptkit_tokens += batch_tokens(inputs)
            return super().training_step(model, inputs, *args, **kwargs)

    Counted.__name__ = Counted.__qualname__ = f"Counted{cls.__name__}"
    return Counted


def callbacks(ctx: Context) -> list[Any]:
    """Progress (the runner's one bar), AdaLoRA's budget update, early stopping, TensorBoard into OUT."""
    from transformers import TrainerCallback

    r = ctx.request
    cbs: list[Any] = []

    class Progress(TrainerCallback):
        def __init__(self) -> None:
            self.trainer: Any = None
            self.t0 = time.perf_counter()
            self.last: dict[str, float] = {}

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.t0 = time.perf_counter()
            self.start_tokens = self.trainer.adaptkit_tokens if self.trainer is not None else 0

        def _report(self, state: Any) -> None:
            if not state.is_world_process_zero:
                return
            m = dict(self.last)
            if self.trainer is not None:
                dt = time.perf_counter() - self.t0
                toks = (self.trainer.adaptkit_tokens - self.start_tokens) * ctx.world_size
                if dt > 0 and toks:
                    m["tokens_per_second"] = toks / dt
            r.report(state.global_step, state.max_steps, m)

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self._report(state)

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            for k in ("loss", "eval_loss"):
                if logs and k in logs:
                    self.last[k] = float(logs[k])
            self._report(state)

    progress = Progress()
    cbs.append(progress)
    if r.adapter.kind == "adalora":
        class AdaLoraBudget(TrainerCallback):
            """AdaLoRA reallocates ranks from the gradients after each optimizer step (before zero_grad)."""

            def on_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
                m = model
                while m is not None and not hasattr(m, "update_and_allocate"):
                    m = getattr(m, "base_model", None) if getattr(m, "base_model", None) is not m else None
                if m is not None:
                    m.update_and_allocate(state.global_step)

        cbs.append(AdaLoraBudget())
    if r.settings.early_stopping_patience:
        from transformers import EarlyStoppingCallback

        cbs.append(EarlyStoppingCallback(early_stopping_patience=r.settings.early_stopping_patience))
    if "tensorboard" in r.settings.report_to:
        from transformers.integrations import TensorBoardCallback

        tb = TensorBoardCallback()
        tb.logging_dir = str(Path(r.output) / "runs")
        cbs.append(tb)
    return cbs


def attach(trainer: Any, cbs: list[Any]) -> None:
    """Give our callbacks the trainer; drop transformers' own printer/tqdm (adaptkit shows one bar, and
    stdout stays clean for ``--json``)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    for cb in cbs:
        if hasattr(cb, "trainer") and cb.trainer is None:
            cb.trainer = trainer


# -- the LM head ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def compact_lm_head(enabled: bool) -> Iterator[bool]:
    """While active, TRL's fused LM head scores only label-carrying positions on CPU as well (yields whether
    it does). TRL decides per call through ``trl.trainer.utils._use_triton(device)``: True selects the compact
    rows (``hidden[mask]``), False every row with the ignored ones zeroed afterwards -- the same per-token
    log-probabilities, loss and gradients either way (masked positions contribute exact zeros). The kernel
    itself keeps asking its own ``_use_triton``, so on CPU it still runs the torch tiles. A TRL without that
    gate trains as it always does (yields False)."""
    if not enabled:
        yield False
        return
    try:
        import trl.trainer.utils as tu
    except ImportError:
        yield False
        return
    gate = getattr(tu, "_use_triton", None)
    if not callable(gate):
        yield False
        return

    def compact_gate(device: Any) -> bool:
        return getattr(device, "type", None) == "cpu" or bool(gate(device))

    tu._use_triton = compact_gate
    try:
        yield True
    finally:
        tu._use_triton = gate


# -- guards ---------------------------------------------------------------------------------------------------

def label_tokens(batch: Any) -> int | None:
    """Tokens that carry a label in one batch (None: this batch layout has no token labels, e.g. GRPO)."""
    if not isinstance(batch, dict):
        return None
    if "labels" in batch and hasattr(batch["labels"], "ne"):
        return int(batch["labels"].ne(-100).sum().item())
    if "completion_mask" in batch and hasattr(batch["completion_mask"], "sum"):
        return int(batch["completion_mask"].sum().item())
    if "chosen_labels" in batch:
        return int(batch["chosen_labels"].ne(-100).sum().item()) + int(batch["rejected_labels"].ne(-100).sum().item())
    return None


def check_label_tokens(ctx: Context, trainer: Any, why: str) -> int | None:
    """Count the label-carrying tokens of the first batches; an error if there are none. The global RNG is
    restored afterwards, so the training order is what it would have been without the check."""
    import torch

    if len(trainer.train_dataset) == 0:
        raise ConfigError(f"train data {ctx.request.train_data.path}: no row is left to train on after "
                          f"preparation ({why})")
    total, layout = 0, False
    with torch.random.fork_rng(devices=[]):
        for i, batch in enumerate(trainer.get_train_dataloader()):
            if i >= GUARD_BATCHES:
                break
            n = label_tokens(batch)
            if n is None:
                return None
            layout = True
            total += n
    if layout and total == 0:
        raise ConfigError(f"train data {ctx.request.train_data.path}: no label-carrying tokens in the first "
                          f"{GUARD_BATCHES} batches, so the loss would train on nothing ({why})")
    return total


def check_pad_eos(ctx: Context, tok: Any) -> None:
    if tok.pad_token_id is not None and tok.pad_token_id == tok.eos_token_id:
        ctx.warn(f"pad token == eos token ({tok.eos_token!r}): collators that mask padding by token id also "
                 "mask EOS out of the loss and the model never learns to stop; adaptkit-trl masks padding by "
                 "length (EOS stays in the loss), but set options.pad_token (sft) to a distinct token if this "
                 "data is also trained elsewhere")


# -- running and the artifact ---------------------------------------------------------------------------------

def _final_metrics(trainer: Any, train_output: Any) -> dict[str, float]:
    m: dict[str, float] = {}
    for k, v in (train_output.metrics or {}).items():
        if isinstance(v, (int, float)) and k in ("train_loss", "train_runtime", "epoch"):
            m[k] = float(v)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    if losses:
        m["final_loss"] = float(losses[-1])
        m["first_loss"] = float(losses[0])
    evals = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e]
    if evals:
        m["best_eval_loss"] = float(min(evals))
    if trainer.state.best_metric is not None:
        m["best_eval_loss"] = float(trainer.state.best_metric)
    last = next((e for e in reversed(trainer.state.log_history) if "loss" in e), {})
    for k, v in last.items():
        if isinstance(v, (int, float)) and k.startswith(("rewards/", "reward", "mean_token_accuracy", "logps/")):
            m[k] = float(v)
    return m


def train_and_save(ctx: Context, trainer: Any, *, tokenizer: Any, extra_metrics: Callable[[Any], dict[str, float]] | None = None) -> TrainResult:
    """Train (resuming if asked), evaluate, save the artifact into ``request.output``; the TrainResult."""
    from adaptkit_trl.versions import versions

    r = ctx.request
    out = Path(r.output)
    with compact_lm_head(r.settings.compact_lm_head) as compact:
        t0 = time.perf_counter()
        try:
            train_output = trainer.train(resume_from_checkpoint=str(r.resume_from) if r.resume_from else None)
        except (ValueError, RuntimeError) as exc:
            raise AdaptkitError(f"{r.method} training failed: {type(exc).__name__}: "
                                f"{' '.join(str(exc).split())[:400]}") from exc
        seconds = time.perf_counter() - t0
        metrics = _final_metrics(trainer, train_output)
        metrics["compact_lm_head"] = 1.0 if compact else 0.0
        history = list(trainer.state.log_history)  # what happened while training (the final evaluation is not)
        if trainer.eval_dataset is not None:
            ev = trainer.evaluate()
            for k, v in ev.items():
                if isinstance(v, (int, float)) and k.startswith("eval_") and not k.endswith(("runtime", "per_second")):
                    metrics[k] = float(v)
    if extra_metrics is not None:
        metrics.update(extra_metrics(trainer))
    tokens = int(getattr(trainer, "adaptkit_tokens", 0))
    if ctx.world_size > 1:
        import torch
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            t = torch.tensor([tokens], dtype=torch.long)
            dist.all_reduce(t)
            tokens = int(t.item())
    if not tokens:  # GRPO: TRL logs the tokens it generated and read
        tokens = int(max((e.get("num_tokens", 0) for e in trainer.state.log_history), default=0))
    if tokens and seconds > 0:
        metrics["tokens_per_second"] = tokens / seconds
    trainer.save_model(str(out))
    if ctx.rank == 0:
        tokenizer.save_pretrained(str(out))
        for junk in ("training_args.bin",):  # a pickle: never part of an adaptkit artifact
            (out / junk).unlink(missing_ok=True)
        with (out / "train_log.jsonl").open("w", encoding="utf-8") as fh:
            for e in history:
                fh.write(json.dumps({k: v for k, v in e.items() if isinstance(v, (int, float, str))}) + "\n")
    trainer.accelerator.wait_for_everyone()
    best = trainer.state.best_model_checkpoint
    return TrainResult(metrics=metrics, artifacts=_artifacts(out, r.adapter.kind), steps=int(trainer.state.global_step),
                       tokens=tokens, seconds=seconds, best_checkpoint=Path(best).name if best else None,
                       base_quantization=ctx.base_quantization, versions=versions(), warnings=list(ctx.warnings))


def _artifacts(out: Path, kind: str) -> dict[str, str]:
    a = {"tokenizer": "tokenizer.json" if (out / "tokenizer.json").exists() else "tokenizer_config.json",
         "log": "train_log.jsonl"}
    if kind == "full":
        a["model"] = "model.safetensors" if (out / "model.safetensors").exists() else "model.safetensors.index.json"
    else:
        a["adapter"] = "adapter_model.safetensors"
        a["adapter_config"] = "adapter_config.json"
    if (out / "chat_template.jinja").exists():
        a["chat_template"] = "chat_template.jinja"
    if (out / "runs").is_dir():
        a["tensorboard"] = "runs"
    return a
