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
        TrainerRegistry,
    )
    from adaptkit.steps import Step

hookspec = pluggy.HookspecMarker("adaptkit")

#: Bumped when a hook is removed or changes meaning (never within a major version).
HOOKSPEC_VERSION = 1


@hookspec
def adaptkit_register_mergers(registry: "MergerRegistry") -> None:
    """Register merge methods.

    Call ``registry.register(MergeMethod(name=..., impl="pkg.mod:func", params=(Param(...), ...)))``.
    ``impl`` is called as ``func(inputs: adaptkit.merge.api.MergeInputs) -> torch.Tensor`` once per output
    tensor: a pure function over a group of same-named tensors (already upcast to fp32/fp64) and the validated
    parameters for that tensor; it never opens a file and never rounds to the output dtype. Parameters are
    declared (name, type, default, scope ``global``/``model``/``both``, range, choices) so configs are
    validated before any tensor is read. Set ``requires_base`` if the method needs ``base_model`` and
    ``randomized`` if it draws random numbers (it must use ``inputs.generator(i)``).
    """


@hookspec
def adaptkit_register_quantizers(registry: "QuantizerRegistry") -> None:
    """Register quantization methods with ``registry.register(Quantizer(name=..., impl=..., params=...,
    formats=(...)))``. ``adaptkit quantize --method NAME`` resolves NAME here; the call contract of ``impl`` is
    defined by ``adaptkit_quant.api`` (the reference quantizer plugin)."""


@hookspec
def adaptkit_register_trainers(registry: "TrainerRegistry") -> None:
    """Register training recipes (SFT, DPO, KTO, ORPO, GRPO, ...) with ``registry.register(Trainer(...))``."""


@hookspec
def adaptkit_register_evaluators(registry: "EvaluatorRegistry") -> None:
    """Register evaluators (perplexity, bits-per-byte, benchmark tasks, probes, gates) with
    ``registry.register(Evaluator(...))``."""


@hookspec
def adaptkit_register_loaders(registry: "LoaderRegistry") -> None:
    """Register checkpoint loaders with ``registry.register(Loader(name, impl, detect=..., priority=...))``.

    ``detect(path) -> bool`` must be cheap (file names, ``config.json``, safetensors headers) and never raise
    for a path it does not understand. For a given path the loader with the highest ``priority`` whose
    ``detect`` accepts it wins (first result), so a quantized-checkpoint loader (which dequantizes on load)
    outranks the plain safetensors loader. ``impl(path, **options)`` returns an object with the interface of
    ``adaptkit.io.Checkpoint`` (``names()``, ``info(name)``, ``get(name)``, ``config``, ``close()``).
    """


@hookspec
def adaptkit_register_commands(cli: "click.Group") -> None:
    """Add commands to the ``adaptkit`` CLI group, e.g. ``cli.add_command(my_command)``.

    Called when the CLI starts, so keep the module light: import heavy packages inside the command body.
    A command name that is already taken is reported as a plugin error and the new command is dropped.
    """


@hookspec(firstresult=True)
def adaptkit_run_step(step: "Step") -> Any:
    """Run one pipeline step (``step.kind`` is ``merge``, ``quantize``, ``train``, ``eval`` or ``verify``).

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
