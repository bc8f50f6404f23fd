"""Every adaptkit hook, with the docstrings that are the plugin-author reference.

A plugin is a module (or object) with functions decorated ``@adaptkit.hookimpl`` whose names match the hooks
below. Built-in plugins are listed in ``adaptkit.plugins.DEFAULT_PLUGINS``; third-party plugins are found
through the entry-point group ``adaptkit``::

    # pyproject.toml of your distribution
    [project.entry-points.adaptkit]
    my_plugin = "my_package.plugin"

Call semantics (see specs/plugin-contract.md for the whole contract):

* **Registration hooks** (``adaptkit_register_*``) are called once per plugin, each call with the registry's
  owner set to that plugin, so names are attributed and clashes reported with both owners. A plugin whose
  registration raises is recorded as failed (``adaptkit plugins`` shows the error) and its partial
  registrations are discarded; the rest of the CLI keeps working.
* Nothing may depend on the order in which plugins are called.
* Keep plugin modules light: import torch and friends inside the implementation functions, which the
  registries reference lazily as ``"package.module:function"`` strings.
* Versioning: within a major version of adaptkit, hooks may gain new arguments (pluggy passes only the
  arguments your implementation names) but never lose or rename one.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    import click

    from adaptkit.registry import (
        EvaluatorRegistry,
        LoaderRegistry,
        MergerRegistry,
        QuantizerRegistry,
        RewardRegistry,
        TrainerRegistry,
    )
    from adaptkit.steps import Step

hookspec = pluggy.HookspecMarker("adaptkit")

#: Bumped when a hook is removed or changes meaning (never within a major version).
HOOKSPEC_VERSION = 1


@hookspec
def adaptkit_register_mergers(registry: "MergerRegistry") -> None:
    """Register merge methods (kind ``merge``; contract module :mod:`adaptkit.merge.api`).

    Call ``registry.register(MergeMethod(name=..., impl="pkg.mod:func", params=(Param(...), ...)))``.
    ``impl`` is called as ``func(inputs: adaptkit.merge.api.MergeInputs) -> torch.Tensor`` once per output
    tensor: a pure function over a group of same-named tensors (already upcast to fp32/fp64, on the compute
    device) and the validated parameters for that tensor; it never opens a file and never rounds to the
    output dtype (the engine rounds once). Parameters are declared (name, type, default, scope
    ``global``/``model``/``both``, range, choices) so configs are validated before any tensor is read.

    Declared capabilities (fields of ``MergeMethod``; the engine never looks at a method's name):

    * ``requires_base`` / ``uses_base`` / ``min_models`` / ``max_models``: what the config must provide;
    * ``randomized``: it draws random numbers, only from ``inputs.generator(i)`` (seeded per tensor/model);
    * ``row_separable``: ``True`` or ``"pkg.mod:func"`` (``func(params, global_params) -> bool``): the result
      for a block of rows depends only on those rows, so the engine may stream a large tensor in row blocks;
    * ``propagates_nonfinite``: NaN/Inf in an input always reaches the result (a weighted sum), so the engine
      checks the result instead of every input;
    * ``in_place``: it may overwrite its inputs when ``inputs.owned`` is true (the engine's own copies);
    * ``identity_params``: a single-model task whose parameters equal these is copied without math.

    The engine streams inputs through the loader registry (safetensors, GGUF, quantized checkpoints
    dequantized on load) and writes through the one publisher (:mod:`adaptkit.io.publish`).
    """


@hookspec
def adaptkit_register_quantizers(registry: "QuantizerRegistry") -> None:
    """Register quantizers (kind ``quantize``; contract module :mod:`adaptkit.quantize.api`).

    Call ``registry.register(Quantizer(name=..., impl="pkg.mod:func", formats=("gptq",), ...))``; a plugin
    needs adaptkit alone (``examples/adaptkit-example-quant`` is a complete one). The runner
    (:mod:`adaptkit.quantize.runner`) opens the input through the loader registry, decides the target
    linears (2-D weights inside ``...layers.N.``), builds a ``QuantizeRequest`` and calls
    ``func(request) -> Iterable[(name, item)]``, a generator yielding, as soon as each is ready:

    * ``(module_name, result)`` exactly once for every name in ``request.targets`` (``"model.layers.0.
      self_attn.q_proj"``, no ``.weight``): a ``QuantizedLinear`` (integer codes, fp16-representable scales,
      integer zero points, ``g_idx``: ``W_hat = (codes - zeros[g_idx].T) * scales[g_idx].T``) or the result
      type the chosen format declares as its ``ITEM`` (NF4: ``adaptkit.quantize.api.BlockwiseQuantized``);
    * optionally ``(tensor_name, torch.Tensor)`` replacing a non-quantized tensor of the same name and shape
      (AWQ folds its scales into norms and biases).

    The runner packs each result into the output format and streams it to disk the moment it arrives, copies
    every other tensor, writes ``config.json`` with ``quantization_config`` and publishes atomically.
    Algorithms read fp32 weights with ``request.weight(module)``, the tokenizer with ``request.tokenizer()``
    (a GGUF input writes its tokenizer files first), the model config as the loader presents it in
    ``request.config``, calibration token ids with ``request.calibration_ids(tokenizer)``. The runner shows
    one progress bar and advances it once per yielded target; ``request.report(status)`` sets its status
    text (e.g. ``"layer 3/30"``).

    Declared capabilities: ``formats`` (core checkpoint formats it can produce, :data:`adaptkit.formats.
    FORMATS`; the first is the default), ``bits`` (widths it produces), ``accepts`` (which common options
    of ``adaptkit quantize`` it honours: ``bits``, ``group_size``, ``sym``, ``act_order``, ``damp``,
    ``partial_groups`` -- a user setting another gets an error, never a silently ignored option),
    ``needs_calibration`` (the runner validates the calibration source first). Method-specific options are
    ``params`` (``adaptkit quantize -o KEY=VALUE``), validated and defaulted before the call. An unknown
    format or option name makes the registration fail with a one-line error.
    """


@hookspec
def adaptkit_register_trainers(registry: "TrainerRegistry") -> None:
    """Register trainers (kind ``train``; contract module :mod:`adaptkit.train.api`).

    Call ``registry.register(Trainer(name="sft", impl="pkg.mod:func", data_formats=("messages", ...),
    adapters=("lora", "qlora", ...), params=(...)))``; ``impl`` is called once per run as
    ``func(request: adaptkit.train.api.TrainRequest) -> adaptkit.train.api.TrainResult``.

    The runner (:func:`adaptkit.train.runner.run_train`) checks the request against the declared
    capabilities before anything heavy happens -- ``data_formats`` (row shapes in
    ``adaptkit.train.api.DATA_FIELDS``: ``text``, ``messages``, ``prompt_completion``, ``preference``,
    ``unpaired_preference``, ``prompt``), ``adapters`` (``full``, ``lora``, ``qlora``, ``dora``,
    ``rslora``, ``adalora``, ``ia3``, ``prompt_tuning``, ``prefix_tuning``), ``needs_reward`` (rewards
    named in the request, resolved from the reward registry), ``needs_reference``, ``distributed`` -- and
    validates ``options`` against ``params``. The trainer writes its artifacts (a PEFT adapter folder or a
    full model, tokenizer, chat template) into ``request.output``, a temporary folder the one publisher
    renames into place only when the trainer returns; the runner adds ``adaptkit.json`` (base identity with
    sha256 of its weight files, base quantization for QLoRA, the request, final metrics), the model card and
    the manifest. Progress goes through ``request.report(step, total, metrics)``.
    """


@hookspec
def adaptkit_register_rewards(registry: "RewardRegistry") -> None:
    """Register reward functions for RL trainers (GRPO): ``registry.register(Reward(name=..., impl=...))``,
    ``impl(prompts: list[str], completions: list[str], **columns) -> list[float]``."""


@hookspec
def adaptkit_register_evaluators(registry: "EvaluatorRegistry") -> None:
    """Register evaluators (kind ``eval``; contract module :mod:`adaptkit.evaluate.api`).

    Call ``registry.register(Evaluator(name="perplexity", impl="pkg.mod:func", metrics=(("bits_per_byte",
    False), ...), needs_baseline=False, params=(...)))``; ``impl`` is called as ``func(request:
    adaptkit.evaluate.api.EvalRequest) -> adaptkit.evaluate.api.EvalResult``.

    Declared capabilities: ``metrics`` (every metric name it may report, with ``higher_is_better``; the
    runner refuses an undeclared one), ``needs_baseline`` (it compares against ``request.baseline`` itself:
    agreement, KL), ``same_tokenizer`` (a baseline must share the tokenizer: token-level metrics),
    ``generates`` (it runs generation). For evaluators that do not compare by themselves the runner
    (:func:`adaptkit.evaluate.runner.run_eval`) evaluates the baseline with the same request and fills each
    metric's ``baseline``, so deltas and release gates (``adaptkit verify``) work for any evaluator. Models
    are local paths any loader reads (quantized checkpoints included); tasks are shipped files.
    """


@hookspec
def adaptkit_register_loaders(registry: "LoaderRegistry") -> None:
    """Register checkpoint loaders with ``registry.register(Loader(name, impl, detect=..., priority=...))``.

    ``detect(path) -> bool`` must be cheap (file names, magic bytes, ``config.json``, safetensors headers)
    and must not raise (a loader whose ``detect`` raises is reported as its plugin's error). For a given
    path the loader with the highest ``priority`` whose ``detect`` accepts it wins, so a quantized-checkpoint
    loader (which dequantizes on load, ``dequantizes=True``) outranks the plain safetensors loader.
    ``impl(path, **options)`` returns an object with the interface of ``adaptkit.io.Checkpoint``
    (``names()``, ``info(name)``, ``get(name)``, ``config``, ``files``, ``total_bytes``, ``path``,
    ``close()``) and a ``source_format`` attribute: ``None`` for stored floating-point weights, else the
    quantized format it dequantized (``"gptq"``, ``"gguf:Q4_1"``...). Optionally ``write_aux(dst,
    config=False)`` writes the tokenizer / chat template / generation config files when the source keeps
    them in another form (a GGUF file). Every command opens its inputs through this registry
    (``host.open_model``), which also records the loader's qualified name as ``checkpoint.loader``.
    """


@hookspec
def adaptkit_register_commands(cli: "click.Group") -> None:
    """Add commands to the ``adaptkit`` CLI group, e.g. ``cli.add_command(my_command)``.

    Called when the CLI starts, so keep the module light: import heavy packages inside the command body.
    A command name that is already taken is reported as a plugin error and the new command is dropped.
    """


@hookspec(firstresult=True)
def adaptkit_run_step(step: "Step") -> Any:
    """Run one step. Every command runs its work as a step on the invocation's one host, so ``step.kind``
    is one of ``merge``, ``quantize``, ``dequantize``, ``train``, ``eval`` (and ``verify``,
    ``merge-adapter`` as those commands arrive).

    adaptkit's own implementation (``trylast``) calls ``step.run()`` and returns its result. Plugins add
    behaviour *around* any step with a new-style wrapper::

        @hookimpl(wrapper=True)
        def adaptkit_run_step(step):
            start = time.perf_counter()
            try:
                return (yield)          # the result of the step (exceptions propagate through here)
            finally:
                step.metrics["my_plugin.seconds"] = time.perf_counter() - start

    Wrappers may read ``step.kind``, ``step.name`` and ``step.info`` and add to ``step.metrics``; they must
    not swallow exceptions.
    """
