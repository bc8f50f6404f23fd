"""The ``lmeval`` evaluator: lm-eval tasks, run in-process on the already loaded model.

* the model is wrapped in lm-eval's ``HFLM`` (``pretrained=<the loaded model>``), so quantized and GGUF inputs
  work like any other (adaptkit's loaders read them) and nothing is loaded twice;
* tasks come from the shipped folder ``adaptkit_eval/tasks`` only: ``TaskManager(include_path=...,
  include_defaults=False)`` indexes our few YAML files (~10 ms) instead of lm-eval's thousands of built-in
  tasks (23-28 s), and a task name that is not ours cannot silently resolve to one that downloads;
* offline: ``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE``, ``TRANSFORMERS_OFFLINE`` and ``HF_EVALUATE_OFFLINE``
  are set for the run (task data is built from installed packages by ``custom_dataset`` functions);
* no caches: ``cache_requests=False`` and no ``use_cache`` response database (lm-eval keys that database by
  request, not by model, so a second model would be served the first one's answers);
* progress: requests are fed to lm-eval in chunks and reported through the request (one adaptkit bar; lm-eval's
  own tqdm bars are disabled for those calls).

Metrics are lm-eval's (``acc``, ``acc_norm`` for multiple choice; ``bits_per_byte``, ``byte_perplexity``,
``word_perplexity`` for rolling log-likelihood), with lm-eval's stderr where it computes one.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any, Iterator

from adaptkit.errors import ConfigError
from adaptkit.evaluate.api import EvalRequest, EvalResult, Metric, TaskSpec
from adaptkit.registry import Param

METRICS = (("acc", True), ("acc_norm", True), ("bits_per_byte", False), ("byte_perplexity", False),
           ("word_perplexity", False))
PARAMS = (
    Param("dtype", str, "float32", scope="global", choices=("float32", "bfloat16", "float16"),
          help="compute dtype of the model"),
    Param("max_length", int, 2048, scope="global", min=2, max=1 << 20,
          help="HFLM max_length (rolling windows; capped by the model's context length)"),
    Param("bootstrap_iters", int, 1000, scope="global", min=0, max=100000,
          help="lm-eval bootstrap iterations for stderr (0: none)"),
    Param("chunk", int, 256, scope="global", min=1, max=1 << 20,
          help="requests handed to lm-eval per progress update"),
)

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_EVALUATE_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def default_tasks() -> tuple[TaskSpec, ...]:
    from adaptkit_eval import catalog

    return catalog.tasks_for("lmeval")


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """The offline environment for the run (restored afterwards); libraries that read these variables once
    at import time and are already imported get their switch set too."""
    import sys

    saved = {k: os.environ.get(k) for k in OFFLINE_ENV}
    os.environ.update(OFFLINE_ENV)
    flags = []
    for module, attr in (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_DATASETS_OFFLINE"),
                         ("datasets.config", "HF_HUB_OFFLINE")):
        mod = sys.modules.get(module)
        if mod is not None and hasattr(mod, attr):
            flags.append((mod, attr, getattr(mod, attr)))
            setattr(mod, attr, True)
    loggers = {name: logging.getLogger(name).level for name in ("lm_eval", "lm-eval", "evaluate", "datasets")}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for mod, attr, value in flags:
            setattr(mod, attr, value)
        for name, level in loggers.items():
            logging.getLogger(name).setLevel(level)


@contextlib.contextmanager
def no_tqdm() -> Iterator[None]:
    """lm-eval's own tqdm bars off (adaptkit shows one progress bar): the ``tqdm`` name in its modules is
    swapped for a disabled one for the duration of the run."""
    import sys

    from tqdm import tqdm

    def quiet(*args: Any, **kwargs: Any) -> Any:
        kwargs["disable"] = True  # also when lm-eval passes disable=False explicitly
        return tqdm(*args, **kwargs)

    swapped = []
    for name, mod in list(sys.modules.items()):
        if name.startswith("lm_eval") and mod is not None and getattr(mod, "tqdm", None) is tqdm:
            swapped.append(mod)
            mod.tqdm = quiet  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for mod in swapped:
            mod.tqdm = tqdm  # type: ignore[attr-defined]


def make_lm(model: Any, tokenizer: Any, *, batch_size: int, max_length: int, chunk: int, report: Any) -> Any:
    """An lm-eval ``HFLM`` over the loaded model that reports progress through ``report(done, total)``."""
    from lm_eval.models.huggingface import HFLM

    class ProgressHFLM(HFLM):  # type: ignore[misc, valid-type]
        def _chunked(self, fn: Any, requests: list[Any]) -> list[Any]:
            out: list[Any] = []
            total = len(requests)
            for i in range(0, total, chunk):
                out.extend(fn(requests[i:i + chunk], disable_tqdm=True))
                if report is not None:
                    report(min(i + chunk, total), total)
            return out

        def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[Any]:
            return self._chunked(super().loglikelihood, requests)

        def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[Any]:
            return self._chunked(super().loglikelihood_rolling, requests)

        def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[Any]:
            return self._chunked(super().generate_until, requests)

    return ProgressHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                        device=str(model.device))


def task_manager() -> Any:
    from lm_eval.tasks import TaskManager

    from adaptkit_eval.catalog import TASKS_DIR

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False)


def _metrics(task: str, res: dict[str, Any], samples: int | None) -> list[Metric]:
    declared = dict(METRICS)
    out = []
    for key, value in res.items():
        name, _, filt = key.partition(",")
        if name not in declared or not isinstance(value, (int, float)):
            continue
        stderr = res.get(f"{name}_stderr,{filt}")
        out.append(Metric(name, float(value), declared[name], task=task,
                          stderr=float(stderr) if isinstance(stderr, (int, float)) else None, n=samples))
    return out


def evaluate(request: EvalRequest) -> EvalResult:
    from adaptkit_eval import catalog, modeling

    t0 = time.perf_counter()
    specs = [catalog.resolve("lmeval", t, kinds=("text", "multiple_choice")) for t in
             (request.tasks or catalog.default_for("lmeval"))]
    for spec in specs:
        if spec.options.get("builder") == "file":
            known = ", ".join(s.name for s in default_tasks())
            raise ConfigError(f"evaluator 'lmeval' runs the shipped task definitions only ({known}); "
                              f"{spec.path} is a data file (use the perplexity evaluator for it)")
    opts = request.options
    with offline():
        lm_loaded = modeling.load(request.model, host=request.host, device=request.device, dtype=opts["dtype"])
        import lm_eval.api.task  # noqa: F401 - imported before no_tqdm() swaps its tqdm
        import lm_eval.models.huggingface  # noqa: F401
        from lm_eval.evaluator import evaluate as lm_evaluate

        max_len = modeling.max_length(lm_loaded.model, opts["max_length"])
        lm = make_lm(lm_loaded.model, lm_loaded.tokenizer, batch_size=max(1, request.batch_size), max_length=max_len,
                     chunk=opts["chunk"], report=request.report)
        tm = task_manager()
        task_dict = tm.load([s.name for s in specs])
        with no_tqdm():
            out = lm_evaluate(lm=lm, task_dict=task_dict, limit=request.limit, cache_requests=False,
                              bootstrap_iters=opts["bootstrap_iters"], log_samples=request.output is not None,
                              write_out=False, verbosity="ERROR")
    result = EvalResult(evaluator="lmeval")
    result.details["loaded_with"] = lm_loaded.route
    import lm_eval

    result.details["lm_eval_version"] = getattr(lm_eval, "__version__", "")
    n_samples = (out or {}).get("n-samples", {})
    for spec in specs:
        res = (out or {}).get("results", {}).get(spec.name, {})
        n = (n_samples.get(spec.name) or {}).get("effective")
        result.metrics.extend(_metrics(spec.name, res, n))
    if request.output is not None and out and out.get("samples"):
        import json

        for task, rows in out["samples"].items():
            path = modeling.detail_path(request, f"lmeval-{task}")
            with path.open("w", encoding="utf-8") as fh:
                for row in rows:
                    fh.write(json.dumps({k: row.get(k) for k in ("doc_id", "target", "resps", "filtered_resps",
                                                                 "acc", "acc_norm", "bits_per_byte")},
                                        default=str) + "\n")
            result.artifacts[f"lmeval-{task}"] = str(path)
    result.seconds = time.perf_counter() - t0
    return result


evaluate.tasks = default_tasks  # type: ignore[attr-defined]
