"""The streaming merge runner: execute a :class:`~adaptkit.merge.plan.MergePlan` into an output folder.

``run_merge(plan, out)`` walks the planned tensor groups in order; each is computed by
:class:`~adaptkit.merge.executor.TensorExecutor` (read, upcast, check, call the method, round once) and handed
to :class:`adaptkit.io.ShardedWriter`, which writes it at its precomputed offset in the output shard.

Overlap: while group *i* is computed, a reader thread loads group *i+1* (fully, when its upcast inputs fit
in :data:`~adaptkit.merge.budget.PREFETCH_MAX_BYTES`; otherwise it only asks the kernel to read the bytes
ahead), and a writer thread writes group *i-1*. Memory is therefore about one large tensor group (plus a
small prefetched one), never a shard. Torch's intra-op threads (``--threads``) do the math; the result does
not depend on the thread count as long as the method's reductions do not (the built-in methods' contract).

Everything is written through the one publisher (:func:`adaptkit.io.publish.publish_output`): weights,
``config.json``, the tokenizer files of the tokenizer source, the chat template, ``mergekit_config.yml``,
the model card, ``adaptkit.json`` provenance and the manifest; an error leaves nothing at the target.

``run_merge_step`` runs it as a step (``kind == "merge"``) through the host's ``adaptkit_run_step`` hook, and
``merge(config, out)`` is the library entry: plan and run with one plugin host for registry and loaders.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from adaptkit.errors import ConfigError, OutputError
from adaptkit.merge.aux_sources import write_aux_files, write_chat_template
from adaptkit.merge.card import model_card, provenance
from adaptkit.merge.executor import TensorExecutor
from adaptkit.merge.output_config import config_json
from adaptkit.merge.plan import MergePlan, build_plan
from adaptkit.merge.runtime import set_threads
from adaptkit.merge.vocab import write_union_tokenizer

ProgressFn = Callable[[int, int, int, int], None]  # (tensors done, tensors total, bytes done, bytes total)


@dataclass
class MergeResult:
    output: Path
    method: str
    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    files: list[str]
    stats: dict[str, int] = field(default_factory=dict)
    excluded: int = 0
    device: str = "cpu"
    threads: int = 1
    seed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "output": str(self.output),
            "method": self.method,
            "tensors": self.tensors,
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "seconds": round(self.seconds, 3),
            "files": self.files,
            "stats": dict(self.stats),
            "excluded": self.excluded,
            "device": self.device,
            "threads": self.threads,
            "seed": self.seed,
        }


def _check_device(device: str) -> None:
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"--device must be cpu or cuda, got {device!r}")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: CUDA is not available on this machine")


def _check_not_an_input(plan: MergePlan, out: Path) -> None:
    """OUT may not be, contain, or lie inside an input model (``--force`` would replace an input)."""
    target = out.resolve()
    paths = [m.path for m in plan.models] + ([plan.aux_source] if plan.aux_source is not None else [])
    for p in paths:
        f = Path(p).resolve()
        if target == f or f in target.parents or target in f.parents:
            raise OutputError(f"{out}: the output folder overlaps the input model folder {f}; choose another OUT")


def run_merge(
    plan: MergePlan,
    out: str | os.PathLike[str],
    *,
    device: str = "cpu",
    threads: Optional[int] = None,
    max_shard_size: int = 5 * 2**30,
    force: bool = False,
    progress: Optional[ProgressFn] = None,
) -> MergeResult:
    """Execute ``plan`` into the folder ``out`` (published atomically; nothing is left there on error)."""
    import torch

    from adaptkit.io import ShardedWriter, TensorSpec, check_output_target
    from adaptkit.io.publish import publish_output

    out = Path(out)
    _check_device(device)
    check_output_target(out, force)
    _check_not_an_input(plan, out)
    t0 = time.perf_counter()
    prev_threads, n_threads = set_threads(threads)
    ex = TensorExecutor(plan, device)
    total = len(plan.tasks)
    try:
        with publish_output(out, kind="merge", force=force) as pub:
            tmp = pub.path
            specs = [TensorSpec(t.out_name, t.dtype, t.shape) for t in plan.tasks]
            writer = ShardedWriter(tmp, specs, max_shard_size=max_shard_size, metadata={"format": "pt"})
            try:
                _pipeline(ex, plan, writer, progress)
                writer.close()
            except BaseException:
                writer.abort()
                raise
            write_aux_files(pub, plan.aux, plan.models)
            if plan.vocab is not None and plan.vocab.tokenizer_json is not None:
                write_union_tokenizer(tmp, plan.vocab)
            if plan.out_config is not None:
                (tmp / "config.json").write_text(config_json(plan.out_config))
            if plan.chat_template is not None:
                write_chat_template(tmp, plan.chat_template)
            recipe = plan.resolved_yaml()
            (tmp / "mergekit_config.yml").write_text(recipe, encoding="utf-8")
            stats = dict(sorted(ex.stats.items()))
            pub.card_text = model_card(plan, recipe, stats)
            pub.provenance.update(provenance(
                plan,
                settings={"device": device, "threads": n_threads, "max_shard_size": max_shard_size},
                result={"tensors": total, "bytes_read": plan.bytes_read, "bytes_written": plan.bytes_written,
                        "stats": stats, "seconds": round(time.perf_counter() - t0, 3)},
            ))
    finally:
        torch.set_num_threads(prev_threads)
        ex.fadvise.close()
    return MergeResult(
        output=out,
        method=plan.method_name,
        tensors=total,
        bytes_read=plan.bytes_read,
        bytes_written=plan.bytes_written,
        seconds=time.perf_counter() - t0,
        files=sorted(p.name for p in out.iterdir()),
        stats=stats,
        excluded=len(plan.excluded),
        device=device,
        threads=n_threads,
        seed=plan.seed,
    )


def _pipeline(ex: TensorExecutor, plan: MergePlan, writer: Any, progress: Optional[ProgressFn]) -> None:
    tasks = plan.tasks
    total, total_bytes = len(tasks), plan.bytes_written
    done_bytes = 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="adaptkit-read") as reader, ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="adaptkit-write"
    ) as wpool:
        nxt: Optional[Future] = reader.submit(ex.load, tasks[0]) if tasks else None
        pending_write: Optional[Future] = None
        try:
            for i, task in enumerate(tasks):
                assert nxt is not None
                loaded = nxt.result()
                nxt = reader.submit(ex.load, tasks[i + 1]) if i + 1 < len(tasks) else None
                out = ex.compute(task, loaded)
                del loaded
                if pending_write is not None:
                    pending_write.result()
                pending_write = wpool.submit(writer.write, task.out_name, out)
                del out
                done_bytes += task.out_bytes
                if progress is not None:
                    progress(i + 1, total, done_bytes, total_bytes)
            if pending_write is not None:
                pending_write.result()
        except BaseException:
            if nxt is not None:
                nxt.cancel()
            raise


def run_merge_step(host: Any, plan: MergePlan, out: str | os.PathLike[str], *, info: Optional[dict] = None,
                   **options: Any) -> MergeResult:
    """``run_merge`` as a step of kind ``merge`` through ``host.run_step`` (wrapper plugins see it);
    ``options`` are run_merge's, ``info`` extra step information (e.g. the config file)."""
    step_info = {"output": str(out), "device": options.get("device", "cpu"), **(info or {})}
    return host.run_step("merge", plan.method_name, lambda: run_merge(plan, out, **options), **step_info)


def merge(
    config: Any,
    out: str | os.PathLike[str],
    *,
    host: Any = None,
    registry: Any = None,
    seed: int = 0,
    allow_pickle: bool = False,
    device: str = "cpu",
    threads: Optional[int] = None,
    max_shard_size: int = 5 * 2**30,
    force: bool = False,
    progress: Optional[ProgressFn] = None,
    strict: bool = False,
) -> MergeResult:
    """One call for library users and ``adaptkit run``: ``config`` is a YAML path, a mapping, or a
    :class:`~adaptkit.config.MergeConfig`. One plugin ``host`` (default: a new one) provides the loaders, the
    merge methods (unless ``registry`` is given) and the step hook. Relative model paths resolve against the
    working directory (as mergekit), else the YAML file's folder (both existing and different: an error).
    ``strict``: a parameter the method ignores is an error instead of a warning (``plan.warnings``)."""
    from adaptkit.config import MergeConfig, parse_merge_config

    config_path: Optional[Path] = None
    if isinstance(config, (str, os.PathLike)):
        from adaptkit.merge.stages import load_stages, run_stages

        config_path = Path(config)
        stages = load_stages(config_path)
        if len(stages) > 1:  # a multi-stage file: each stage through this same function, in order
            kw = dict(host=host, registry=registry, seed=seed, allow_pickle=allow_pickle, device=device,
                      threads=threads, max_shard_size=max_shard_size, progress=progress, strict=strict)
            return run_stages(stages, config_path, Path(out),
                              lambda c, target, st, final: _merge_cfg(c, config_path, target, force=force, **kw))
        cfg = stages[0].config
    elif isinstance(config, MergeConfig):
        cfg = config
    else:
        cfg = parse_merge_config(config)
    return _merge_cfg(cfg, config_path, out, host=host, registry=registry, seed=seed, allow_pickle=allow_pickle,
                      device=device, threads=threads, max_shard_size=max_shard_size, force=force,
                      progress=progress, strict=strict)


def _merge_cfg(cfg: Any, config_path: Optional[Path], out: Any, *, host: Any, registry: Any, seed: int,
               allow_pickle: bool, device: str, threads: Optional[int], max_shard_size: int, force: bool,
               progress: Optional[ProgressFn], strict: bool) -> MergeResult:
    if host is None:
        from adaptkit.plugins import get_plugin_manager

        host = get_plugin_manager()
    plan = build_plan(cfg, config_path, registry if registry is not None else host.mergers, host=host, seed=seed,
                      allow_pickle=allow_pickle, strict=strict)
    try:
        return run_merge_step(
            host, plan, out, info={"config": str(config_path) if config_path else None},
            device=device, threads=threads, max_shard_size=max_shard_size, force=force, progress=progress,
        )
    finally:
        plan.close()
