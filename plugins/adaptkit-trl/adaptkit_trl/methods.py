"""One entry per registered trainer: ``func(request: TrainRequest) -> TrainResult``.

Each builds the tokenizer, datasets, model (+ adapter) and the TRL trainer with explicit settings
(``engine.make_args``), runs the shared guards and hands over to ``engine.train_and_save``.
"""
from __future__ import annotations

from typing import Any

from adaptkit.errors import ConfigError
from adaptkit.train.api import TrainRequest, TrainResult

from adaptkit_trl import engine
from adaptkit_trl.data import has_generation_markers, load_split, tokenize_messages
from adaptkit_trl.models import apply_adapter, load_base

_CHAT_FORMATS_NEED_TEMPLATE = ("messages",)


def _tokenizer(ctx: engine.Context, pad_token: str = "") -> Any:
    from transformers import AutoTokenizer

    r = ctx.request
    try:
        tok = AutoTokenizer.from_pretrained(str(r.model), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"base {r.model}: no usable tokenizer ({' '.join(str(exc).split())[:200]})") from None
    if pad_token:
        if pad_token not in tok.get_vocab():
            raise ConfigError(f"options.pad_token {pad_token!r} is not a token of {r.model}'s tokenizer")
        tok.pad_token = pad_token
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _is_chat(ds: Any) -> bool:
    if ds is None or len(ds) == 0:
        return False
    row = ds[0]
    return any(isinstance(row.get(k), list) for k in ("messages", "prompt", "completion", "chosen", "rejected"))


def _need_template(ctx: engine.Context, tok: Any, train: Any) -> None:
    if _is_chat(train) and not tok.chat_template:
        raise ConfigError(f"train data {ctx.request.train_data.path}: chat rows need a chat template, and the "
                          f"base {ctx.request.model} has none")


def _model(ctx: engine.Context, n_rows: int, *, task_type: str = "CAUSAL_LM", seq_cls: bool = False) -> Any:
    model, quant = load_base(ctx.request, ctx.device, ctx.bf16, seq_cls=seq_cls)
    ctx.base_quantization = quant
    steps = engine.estimate_steps(ctx.request, n_rows, ctx.world_size)
    return apply_adapter(model, ctx.request, task_type=task_type, total_steps=steps,
                         gradient_checkpointing=ctx.gradient_checkpointing)


def _build(ctx: engine.Context, cls: type, **kwargs: Any) -> Any:
    cbs = engine.callbacks(ctx)
    try:
        trainer = engine.counted(cls)(callbacks=cbs, **kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{ctx.request.method}: {type(exc).__name__}: {' '.join(str(exc).split())[:400]}") from None
    engine.attach(trainer, cbs)
    return trainer


# -- SFT ------------------------------------------------------------------------------------------------------

def sft(request: TrainRequest) -> TrainResult:
    ctx = engine.prepare(request)
    from trl import SFTConfig, SFTTrainer

    opts = request.options
    tok = _tokenizer(ctx, opts.get("pad_token", ""))
    train, evals = load_split(request)
    _need_template(ctx, tok, train)
    fmt = request.train_data.format
    s = request.settings
    trl_assistant_only = False
    why = {"messages": "no assistant turn survives the chat template and max_seq_len",
           "prompt_completion": "every completion is empty or truncated away by max_seq_len",
           "text": "every text is empty after tokenization"}[fmt]
    if fmt == "messages" and opts.get("assistant_only_loss", True):
        if has_generation_markers(tok.chat_template):
            trl_assistant_only = True  # the template marks assistant tokens itself
        else:
            where = f"train data {request.train_data.path}"
            train = tokenize_messages(tok, train, where)
            if evals is not None:
                evals = tokenize_messages(tok, evals, where.replace("train", "eval"))
        why = ("assistant-only loss found no assistant tokens: rows without an assistant turn, a chat template "
               "that drops them, or turns truncated away by max_seq_len")
    model = _model(ctx, len(train))
    args = engine.make_args(
        SFTConfig, ctx, evals is not None, max_length=s.max_seq_len, packing=s.packing,
        completion_only_loss=bool(opts.get("completion_only_loss", True)) if fmt == "prompt_completion" else None,
        assistant_only_loss=trl_assistant_only, dataset_text_field="text", shuffle_dataset=False)
    trainer = _build(ctx, SFTTrainer, model=model, args=args, train_dataset=train, eval_dataset=evals,
                     processing_class=tok)
    engine.check_pad_eos(ctx, tok)
    engine.check_label_tokens(ctx, trainer, why)
    return engine.train_and_save(ctx, trainer, tokenizer=tok)


# -- preference methods ---------------------------------------------------------------------------------------

def _preference(request: TrainRequest, config: str, trainer_cls: str, module: str, **method_kwargs: Any) -> TrainResult:
    import importlib

    ctx = engine.prepare(request)
    mod = importlib.import_module(module)
    cfg_cls, tr_cls = getattr(mod, config), getattr(mod, trainer_cls)
    tok = _tokenizer(ctx)
    train, evals = load_split(request)
    _need_template(ctx, tok, train)
    model = _model(ctx, len(train))
    args = engine.make_args(cfg_cls, ctx, evals is not None, max_length=request.settings.max_seq_len, **method_kwargs)
    trainer = _build(ctx, tr_cls, model=model, args=args, train_dataset=train, eval_dataset=evals,
                     processing_class=tok)
    engine.check_pad_eos(ctx, tok)
    engine.check_label_tokens(ctx, trainer, "every completion is empty or truncated away by max_seq_len")
    return engine.train_and_save(ctx, trainer, tokenizer=tok)


def dpo(request: TrainRequest) -> TrainResult:
    o = request.options
    return _preference(request, "DPOConfig", "DPOTrainer", "trl", beta=o["beta"], loss_type=[o["loss_type"]],
                       label_smoothing=o["label_smoothing"])


def kto(request: TrainRequest) -> TrainResult:
    o = request.options
    if request.settings.batch_size < 2:
        raise ConfigError("kto needs training.batch_size >= 2 (its KL term pairs each prompt with another row's "
                          "completion)")
    return _preference(request, "KTOConfig", "KTOTrainer", "trl", beta=o["beta"],
                       desirable_weight=o["desirable_weight"], undesirable_weight=o["undesirable_weight"])


def orpo(request: TrainRequest) -> TrainResult:
    return _preference(request, "ORPOConfig", "ORPOTrainer", "trl.experimental.orpo", beta=request.options["beta"])


def simpo(request: TrainRequest) -> TrainResult:
    o = request.options
    return _preference(request, "CPOConfig", "CPOTrainer", "trl.experimental.cpo", loss_type="simpo",
                       beta=o["beta"], simpo_gamma=o["gamma"], cpo_alpha=o["cpo_alpha"])


# -- GRPO -----------------------------------------------------------------------------------------------------

def _text(x: Any) -> str:
    if isinstance(x, list):  # conversational: the messages' contents (a completion is the assistant turn)
        return "".join(m.get("content", "") for m in x if isinstance(m, dict))
    return str(x)


def reward_functions(request: TrainRequest) -> list[Any]:
    """The request's rewards as TRL reward callables (text in, floats out; options bound)."""
    funcs = []
    for name in request.rewards:
        comp = request.host.rewards.get(name)
        opts = comp.resolve_options(request.reward_options.get(name, {}), where=f"reward {name}")
        impl = comp.load()
        if comp.name == "json_schema" and opts.get("schema"):
            from adaptkit_trl.rewards import check_json_schema_option

            check_json_schema_option(opts)

        def call(prompts: list[Any], completions: list[Any], _impl: Any = impl, _opts: dict = opts,
                 _name: str = name, **columns: Any) -> list[float]:
            cols = {k: v for k, v in columns.items() if k not in ("trainer_state", "completion_ids", "log_extra", "log_metric")}
            scores = _impl([_text(p) for p in prompts], [_text(c) for c in completions], **cols, **_opts)
            if len(scores) != len(completions):
                raise ConfigError(f"reward {_name!r} returned {len(scores)} scores for {len(completions)} completions")
            return [float(s) for s in scores]

        call.__name__ = name.replace("-", "_").replace(":", "_")
        funcs.append(call)
    return funcs


def grpo(request: TrainRequest) -> TrainResult:
    ctx = engine.prepare(request)
    from trl import GRPOConfig, GRPOTrainer

    o = request.options
    s = request.settings
    group = s.batch_size * s.grad_accum * ctx.world_size
    if group % o["num_generations"]:
        raise ConfigError(f"grpo: training.batch_size x grad_accum x processes ({group}) must be a multiple of "
                          f"options.num_generations ({o['num_generations']})")
    funcs = reward_functions(request)
    tok = _tokenizer(ctx)
    tok.padding_side = "left"  # generation
    train, evals = load_split(request)
    _need_template(ctx, tok, train)
    model = _model(ctx, len(train) * o["num_generations"])
    args = engine.make_args(GRPOConfig, ctx, evals is not None, num_generations=o["num_generations"],
                            max_completion_length=o["max_completion_length"], temperature=o["temperature"],
                            beta=o["beta"], reward_weights=list(request.reward_weights) if request.reward_weights else None,
                            shuffle_dataset=True, remove_unused_columns=False)
    trainer = _build(ctx, GRPOTrainer, model=model, args=args, train_dataset=train, eval_dataset=evals,
                     processing_class=tok, reward_funcs=funcs)
    engine.check_pad_eos(ctx, tok)
    return engine.train_and_save(ctx, trainer, tokenizer=tok)


# -- reward model ---------------------------------------------------------------------------------------------

def reward(request: TrainRequest) -> TrainResult:
    ctx = engine.prepare(request)
    from trl import RewardConfig, RewardTrainer

    tok = _tokenizer(ctx)
    train, evals = load_split(request)
    _need_template(ctx, tok, train)
    model = _model(ctx, len(train), task_type="SEQ_CLS", seq_cls=True)
    base_cfg = getattr(model, "config", None)
    if base_cfg is not None:
        base_cfg.pad_token_id = tok.pad_token_id
    c = request.options["center_rewards_coefficient"]
    args = engine.make_args(RewardConfig, ctx, evals is not None, max_length=request.settings.max_seq_len,
                            center_rewards_coefficient=c or None)
    trainer = _build(ctx, RewardTrainer, model=model, args=args, train_dataset=train, eval_dataset=evals,
                     processing_class=tok)
    engine.check_pad_eos(ctx, tok)
    return engine.train_and_save(ctx, trainer, tokenizer=tok)
