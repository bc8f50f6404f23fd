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
from adaptkit.train.data import check_dataset

#: ``report_to`` backends and the module each one needs (checked before anything runs)
REPORTERS: dict[str, tuple[str, ...]] = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}


def _has_module(name: str) -> bool:
    import importlib.util
    import sys

    if name in sys.modules:
        return sys.modules[name] is not None
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def check_environment(request: TrainRequest) -> None:
    """What the request needs installed: bitsandbytes for QLoRA, the ``report_to`` backends."""
    if request.adapter.kind == "qlora" and not _has_module("bitsandbytes"):
        raise ConfigError("adapter kind 'qlora' needs bitsandbytes (NF4 base weights), which is not installed: "
                          "pip install bitsandbytes")
    for backend in request.settings.report_to:
        mods = REPORTERS.get(backend)
        if mods is None:
            raise ConfigError(f"report_to {backend!r} is not supported (supported: {', '.join(REPORTERS)})")
        if not any(_has_module(m) for m in mods):
            raise ConfigError(f"report_to {backend!r} needs the {mods[0]} package, which is not installed: "
                              f"pip install {mods[0]}")


def process_rank() -> tuple[int, int]:
    """``(rank, world_size)`` when running under torchrun / ``accelerate launch``, else ``(0, 1)``."""
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 0, 1


def checkpoint_dir_for(out: str | os.PathLike[str]) -> Path:
    """Where a run writing ``out`` keeps its intermediate checkpoints (beside ``out``, never inside)."""
    t = Path(os.path.abspath(out))
    return t.parent / f".{t.name}.adaptkit-train"


def latest_checkpoint(folder: Path) -> Path | None:
    """The ``checkpoint-N`` folder with the largest N in ``folder`` (None if there is none)."""
    best: tuple[int, Path] | None = None
    if folder.is_dir():
        for p in folder.iterdir():
            head, _, num = p.name.partition("-")
            if head == "checkpoint" and num.isdigit() and p.is_dir() and (best is None or int(num) > best[0]):
                best = (int(num), p)
    return best[1] if best else None


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
        rows = check_dataset(spec.path, spec.format, max_rows=spec.max_rows, what=what)
        if spec is request.train_data and request.eval_split is not None and rows * request.eval_split < 1:
            raise ConfigError(f"{what} {spec.path}: eval_split {request.eval_split} of {rows} rows holds out no row")
    if request.eval_data is not None and request.eval_data.format != request.train_data.format:
        raise ConfigError(f"eval data {request.eval_data.path}: format {request.eval_data.format!r} differs from the "
                          f"train data's {request.train_data.format!r}")
    if request.adapter.kind not in trainer.adapters:
        raise ConfigError(f"trainer {name!r} cannot train a {request.adapter.kind!r} adapter "
                          f"(it can: {', '.join(trainer.adapters)})")
    if trainer.needs_reward and not request.rewards:
        raise ConfigError(f"trainer {name!r} needs at least one reward (known: {', '.join(host.rewards.names()) or 'none'})")
    if request.rewards and not trainer.needs_reward:
        raise ConfigError(f"trainer {name!r} does not use rewards, but {len(request.rewards)} were given")
    for r in request.rewards:
        host.rewards.get(r)  # ConfigError naming the known rewards
    for r, opts in request.reward_options.items():
        if r not in request.rewards:
            raise ConfigError(f"options given for reward {r!r}, which is not among the rewards used")
        host.rewards.get(r).resolve_options(opts, where=f"reward {r}")
    if request.reward_weights is not None and len(request.reward_weights) != len(request.rewards):
        raise ConfigError(f"{len(request.reward_weights)} reward weights for {len(request.rewards)} rewards")
    if request.eval_split is not None:
        if request.eval_data is not None:
            raise ConfigError("give either eval data or eval_split, not both")
        if not 0.0 < request.eval_split < 1.0:
            raise ConfigError(f"eval_split must be a fraction between 0 and 1 (exclusive), got {request.eval_split}")
    check_environment(request)
    if request.settings.nproc > 1 and not trainer.distributed:
        raise ConfigError(f"trainer {name!r} does not run distributed (nproc {request.settings.nproc})")
    return trainer.resolve_options(request.options, where=f"trainer {name}")


def run_train(request: TrainRequest, out: str | os.PathLike[str], *, host: Any, force: bool = False,
               progress: Any = None, resume: bool = False) -> TrainResult:
    """Check, run the trainer as ``Step("train", name)`` and publish ``out`` atomically.

    ``resume``: continue from the latest checkpoint a previous (interrupted) run writing ``out`` left in
    :func:`checkpoint_dir_for` ``(out)`` (a ``ConfigError`` if there is none). Under torchrun / ``accelerate
    launch`` every process runs the trainer; only rank 0 publishes (the others write into a scratch folder).
    A run without ``resume`` starts fresh: checkpoints an earlier interrupted run left are discarded.
    """
    import shutil
    import tempfile

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
    ckpt_dir = Path(request.checkpoint_dir) if request.checkpoint_dir is not None else checkpoint_dir_for(out)
    resume_from = request.resume_from
    if resume and resume_from is None:
        resume_from = latest_checkpoint(ckpt_dir)
        if resume_from is None:
            raise ConfigError(f"--resume: no checkpoint to resume from in {ckpt_dir} (a run writing {out} "
                              "leaves one there every save)")
    impl = trainer.load()
    rank, world = process_rank()
    t0 = time.perf_counter()

    def _call(path: Path) -> tuple[TrainResult, TrainRequest]:
        req = dataclasses.replace(request, output=path, options=options, host=host, checkpoint_dir=ckpt_dir,
                                  resume_from=resume_from,
                                  progress=progress if progress is not None else request.progress)

        def _run() -> TrainResult:
            result = impl(req)
            if not isinstance(result, TrainResult):
                raise AdaptkitError(f"trainer {trainer.name!r} returned {type(result).__name__}, not a TrainResult")
            return result

        result = host.run_step("train", trainer.name, _run, model=str(request.model), output=str(out))
        result.seconds = result.seconds or time.perf_counter() - t0
        return result, req

    if resume_from is None and rank == 0 and ckpt_dir.is_dir():
        shutil.rmtree(ckpt_dir, ignore_errors=True)  # a fresh run: an earlier interrupted run's checkpoints go
    ckpt_existed = ckpt_dir.exists()
    try:
        if rank != 0:  # a worker process of a distributed run: rank 0 publishes
            with tempfile.TemporaryDirectory(prefix=f"adaptkit-train-rank{rank}-") as scratch:
                result, _ = _call(Path(scratch))
            return result
        with publish_output(out, kind="train", force=force,
                            title=f"{trainer.name} fine-tune of {Path(request.model).name}") as pub:
            result, req = _call(pub.path)
            _provenance(pub, trainer, request, req, result, base_identity, world)
    except BaseException:
        # keep the checkpoints of an interrupted run (--resume), but not an empty folder of a run that failed
        # before its first checkpoint
        if rank == 0 and not ckpt_existed and latest_checkpoint(ckpt_dir) is None:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        raise
    shutil.rmtree(ckpt_dir, ignore_errors=True)  # published: the checkpoints have served their purpose
    return result


def _provenance(pub: Any, trainer: Any, request: TrainRequest, req: TrainRequest, result: TrainResult,
                base_identity: dict[str, Any], world: int) -> None:
    quant = result.base_quantization if result.base_quantization is not None else request.adapter.base_quantization
    pub.provenance.update({"base": base_identity, "base_quantization": quant,
                           "recipe": request.recipe, "versions": dict(result.versions),
                           "request": req.describe(), "result": result.to_json()})
    if world > 1:
        pub.provenance["world_size"] = world
    pub.summary.append(f"Trained with the `{trainer.name}` trainer ({request.adapter.kind}) on "
                       f"`{request.train_data.path}`.")
    if result.metrics:
        pub.sections["Final metrics"] = "\n".join(f"* {k}: {v:.6g}" for k, v in sorted(result.metrics.items()))
