"""``adaptkit run PIPELINE.yml``: named steps (train, merge-adapter, merge, quantize, eval, verify) chained by
name, validated whole before anything runs, each step's output content-addressed so that reruns skip finished
steps. Specification: ``specs/pipeline.md``.

Modules (none imports torch at import time):

* :mod:`adaptkit.pipeline.schema` -- the strict YAML schema (one-line errors naming the file and key);
* :mod:`adaptkit.pipeline.graph` -- references between steps, order, cycles;
* :mod:`adaptkit.pipeline.keys` -- cache keys (hash of a step's settings and of its inputs' keys);
* :mod:`adaptkit.pipeline.kinds` -- what each step kind checks before the run and calls during it (the kinds'
  own runners; nothing is re-implemented here);
* :mod:`adaptkit.pipeline.runner` -- the run: skip finished steps, run the others as ``Step`` s through
  ``host.run_step``, record the state, build the summary.
"""
from __future__ import annotations

__all__ = ["load_pipeline", "run_pipeline"]


def __getattr__(name: str):  # lazy: the CLI imports the submodules it needs
    if name == "load_pipeline":
        from adaptkit.pipeline.schema import load_pipeline

        return load_pipeline
    if name == "run_pipeline":
        from adaptkit.pipeline.runner import run_pipeline

        return run_pipeline
    raise AttributeError(name)
