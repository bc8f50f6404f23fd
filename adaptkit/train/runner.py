"""The train runner: the one path every trainer follows (request -> checks -> Step -> trainer -> publisher).

``run_train(request, out, host=...)`` is what ``adaptkit train`` and ``adaptkit run`` call. It never tests a
trainer's name: what it checks is declared on the ``Trainer`` component (see ``adaptkit.hookspecs.
adaptkit_register_trainers``).
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

from adaptkit.errors import AdaptkitError, ConfigError
from adaptkit.train.api import DATA_FIELDS, TrainRequest, TrainResult


def check_request(trainer: Any, request: TrainRequest, host: Any) -> dict[str, Any]:
    """Validate ``request`` against ``trainer``'s declared capabilities; return the resolved options."""
    name = trainer.name
    for spec, what in ((request.train_data, "train data"), (request.eval_data, "eval data")):
        if spec is None:
            continue
        if spec.format not in DATA_FIELDS:
            raise ConfigError(f"{what} {spec.path}: unknown format {spec.format!r} (known: {', '.join(DATA_FIELDS)})")
        if spec.format not in trainer.data_formats:
            raise ConfigError(f"{what} {spec.path}: trainer {name!r} does not train on {spec.format!r} rows "
                              f"(it takes: {', '.join(trainer.data_formats) or 'none'})")
        if not Path(spec.path).is_file():
            raise ConfigError(f"{what} {spec.path}: no such file")
    if request.adapter.kind not in trainer.adapters:
        raise ConfigError(f"trainer {name!r} cannot train a {request.adapter.kind!r} adapter "
                          f"(it can: {', '.join(trainer.adapters)})")
    if trainer.needs_reward and not request.rewards:
        raise ConfigError(f"trainer {name!r} needs at least one reward (known: {', '.join(host.rewards.names()) or 'none'})")
    if request.rewards and not trainer.needs_reward:
        raise ConfigError(f"trainer {name!r} does not use rewards, but {len(request.rewards)} were given")
    for r in request.rewards:
        host.rewards.get(r)  # ConfigError naming the known rewards
    if request.settings.nproc > 1 and not trainer.distributed:
        raise ConfigError(f"trainer {name!r} does not run distributed (nproc {request.settings.nproc})")
    return trainer.resolve_options(request.options, where=f"trainer {name}")


def run_train(request: TrainRequest, out: str | os.PathLike[str], *, host: Any, force: bool = False,
              progress: Any = None) -> TrainResult:
    """Check, run the trainer as ``Step("train", name)`` and publish ``out`` atomically."""
    from adaptkit.io.publish import file_sha256, publish_output

    trainer = host.trainers.get(request.method)
    options = check_request(trainer, request, host)
    base = host.open_model(request.model)  # a readable base, through the loader registry
    try:
        base_identity = {"path": str(request.model), "loader": getattr(base, "loader", None),
                         "source_format": getattr(base, "source_format", None),
                         "sha256": file_sha256(list(base.files))}
    finally:
        base.close()
    impl = trainer.load()
    t0 = time.perf_counter()
    with publish_output(out, kind="train", force=force, title=f"{trainer.name} fine-tune of {Path(request.model).name}") as pub:
        req = dataclasses.replace(request, output=pub.path, options=options, host=host,
                                  progress=progress if progress is not None else request.progress)

        def _run() -> TrainResult:
            result = impl(req)
            if not isinstance(result, TrainResult):
                raise AdaptkitError(f"trainer {trainer.name!r} returned {type(result).__name__}, not a TrainResult")
            return result

        result = host.run_step("train", trainer.name, _run, model=str(request.model), output=str(out))
        result.seconds = result.seconds or time.perf_counter() - t0
        pub.provenance.update({"base": base_identity, "base_quantization": request.adapter.base_quantization,
                               "request": req.describe(), "result": result.to_json()})
        pub.summary.append(f"Trained with the `{trainer.name}` trainer ({request.adapter.kind}) on "
                           f"`{request.train_data.path}`.")
        if result.metrics:
            pub.sections["Final metrics"] = "\n".join(f"* {k}: {v:.6g}" for k, v in sorted(result.metrics.items()))
    return result
