"""The streaming merge executor.

``run_merge(plan, out)`` walks the planned tensor groups in order. For each group it

1. reads the same-named tensors of the participating models from their memory maps and upcasts them to
   the compute dtype (fp32, fp64 when an input is fp64) on the compute device, in one copy per tensor;
2. checks them for NaN/Inf (an input with NaN/Inf is a ``CheckpointError`` naming model and tensor; for the
   built-in ``linear``, whose result is non-finite wherever an input is, the check runs once on the result
   and only a non-finite result checks the inputs);
3. calls the merge method (a pure function, :class:`adaptkit.merge.api.MergeInputs` -> tensor). The upcast
   inputs are the call's own copies, marked ``inputs.owned = True``: built-in task-vector methods compute the
   task vectors in place and write the result into the base tensor (same values, less memory);
4. rounds the result ONCE to the output dtype and hands it to :class:`adaptkit.io.ShardedWriter`, which
   writes it at its precomputed offset in the output shard.

Overlap: while group *i* is computed, a reader thread loads group *i+1* (fully, when its upcast inputs fit
in :data:`PREFETCH_MAX_BYTES`; otherwise it only asks the kernel to read the bytes ahead with
``posix_fadvise(WILLNEED)``), and a writer thread writes group *i-1*. Memory is therefore about one large
tensor group (plus a small prefetched one), never a shard. Torch's intra-op threads (``--threads``) do the
math; the result does not depend on the thread count as long as the method's reductions do not (the
built-in methods' contract). Everything happens inside :func:`adaptkit.io.atomic_output_dir`: an error
leaves nothing at the target.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from adaptkit.errors import CheckpointError, ConfigError, OutputError
from adaptkit.merge.plan import MergePlan, TensorTask

PREFETCH_MAX_BYTES = 64 * 2**20
"""Groups whose upcast inputs are at most this large are loaded ahead by the reader thread."""

ROW_CHUNK_NUMEL = 4 * 2**20
"""Row-separable methods see large tensors in row blocks of at most this many elements per input."""


def row_separable(plan: MergePlan, task: TensorTask, fn: Any) -> bool:
    """Whether the method's result for a block of rows depends only on those rows (so the engine may feed
    a large tensor in row blocks and bound memory). Built-ins: ``linear``; ``task_arithmetic`` without
    sparsification. A plugin declares it with ``impl.adaptkit_row_separable = True``. Randomized methods
    never qualify (their generators are seeded per whole tensor)."""
    if plan.method.randomized:
        return False
    if getattr(fn, "adaptkit_row_separable", False):
        return True
    name = plan.method.name
    if name == "linear":
        return True
    if name == "task_arithmetic":
        return all(float(p.get("density", 1.0)) >= 1.0 for p in task.params)
    return False

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


class _Fadvisor:
    """Asks the kernel to read tensor bytes ahead (cheap, no memory of ours)."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}

    def hint(self, info: Any) -> None:
        if not hasattr(os, "posix_fadvise"):
            return
        fd = self._fds.get(info.file)
        if fd is None:
            try:
                fd = os.open(info.file, os.O_RDONLY)
            except OSError:
                return
            self._fds[info.file] = fd
        try:
            os.posix_fadvise(fd, info.offset, info.nbytes, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass

    def close(self) -> None:
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()


class _Executor:
    def __init__(self, plan: MergePlan, device: str) -> None:
        import torch

        self.torch = torch
        self.plan = plan
        self.device = torch.device(device)
        self.fn = plan.method.load()
        from adaptkit.merge.linear import linear as _builtin_linear

        self._fn_propagates = self.fn is _builtin_linear
        self.stats: Counter = Counter()
        self.fadvise = _Fadvisor()
        from adaptkit.io.dtypes import torch_dtype

        self._torch_dtype = torch_dtype

    # -- reading -----------------------------------------------------------------------------------
    def _raw(self, mi: int, name: str) -> Any:
        return self.plan.models[mi].ckpt.get(name)

    def _check_finite(self, t: Any, mi: int, name: str) -> None:
        torch = self.torch
        if t.numel() == 0:
            return
        # one vectorised reduction; a non-finite sum means NaN/Inf (or an overflow: check exactly then)
        s = float(t.sum(dtype=torch.float64) if t.dtype == torch.float64 else t.sum())
        if math.isfinite(s):
            return
        bad = ~torch.isfinite(t)
        n = int(bad.sum())
        if n:
            kinds = []
            if bool(torch.isnan(t).any()):
                kinds.append("NaN")
            if bool(torch.isinf(t).any()):
                kinds.append("Inf")
            raise CheckpointError(
                f"model {self.plan.models[mi].ref!r}: tensor {name!r} contains {'/'.join(kinds)} "
                f"({n} of {t.numel()} values)"
            )

    def _defer_check(self, task: TensorTask) -> bool:
        """Whether the NaN/Inf check of ``task``'s inputs may wait for the result: for methods whose output is
        non-finite wherever an input is (``linear``: ``sum_i w_i x_i``, a zero weight gives 0 * inf = NaN),
        one pass over the result replaces one pass per input; only a non-finite result checks the inputs
        (same error), and a finite one proves them finite."""
        return task.kind == "merge" and task.base is None and self._fn_propagates

    def _upcast(self, task: TensorTask, mi: int, name: str, rows: Optional[tuple[int, int]] = None) -> Any:
        torch = self.torch
        raw = self._raw(mi, name)
        if rows is not None:
            raw = raw[rows[0]:rows[1]]
        dtype = torch.float64 if task.compute_float64 else torch.float32
        if self.device.type == "cpu":
            out = torch.empty(raw.shape, dtype=dtype)
            out.copy_(raw)
        else:
            out = raw.to(self.device, non_blocking=False).to(dtype)
            if out.data_ptr() == raw.data_ptr():  # pragma: no cover - defensive
                out = out.clone()
        if not self._defer_check(task):
            self._check_finite(out, mi, name)
        return out

    def load(self, task: TensorTask) -> Optional[dict[tuple[int, str], Any]]:
        """Reader-thread work: the upcast inputs of a small group, or just a read-ahead hint."""
        if task.kind != "merge":
            for mi, name in task.all_inputs():
                self.fadvise.hint(self.plan.models[mi].ckpt.info(name))
            return None
        item = 8 if task.compute_float64 else 4
        if len(task.all_inputs()) * task.numel * item > PREFETCH_MAX_BYTES:
            for mi, name in task.all_inputs():
                self.fadvise.hint(self.plan.models[mi].ckpt.info(name))
            return None
        return {(mi, name): self._upcast(task, mi, name) for mi, name in task.all_inputs()}

    # -- computing ---------------------------------------------------------------------------------
    def compute(self, task: TensorTask, loaded: Optional[dict[tuple[int, str], Any]]) -> Any:
        torch = self.torch
        out_dtype = self._torch_dtype(task.dtype)
        if task.kind == "identical":
            ref = None
            for mi, name in task.inputs:
                t = self._raw(mi, name)
                if ref is None:
                    ref = (mi, t)
                elif not torch.equal(ref[1], t):
                    raise CheckpointError(
                        f"non-float tensor {name!r} differs between models {self.plan.models[ref[0]].ref!r} and "
                        f"{self.plan.models[mi].ref!r}; it cannot be merged (add it to 'exclude' or make them equal)"
                    )
            assert ref is not None
            return ref[1]
        if task.kind == "copy":
            mi, name = task.all_inputs()[0]
            raw = self._raw(mi, name)
            if raw.is_floating_point():
                self._check_finite(raw, mi, name)
            return raw if raw.dtype == out_dtype else raw.to(out_dtype)
        if (loaded is None and task.numel > ROW_CHUNK_NUMEL and len(task.shape) >= 2 and task.shape[0] > 1
                and row_separable(self.plan, task, self.fn)):
            return self._compute_rows(task, out_dtype)
        if loaded is None:
            if task.numel * (8 if task.compute_float64 else 4) > 32 * 2**20:
                _trim_heap()  # blocks kept for reuse by small groups are not needed by this large one
            loaded = {(mi, name): self._upcast(task, mi, name) for mi, name in task.all_inputs()}
        return self._call(task, loaded, out_dtype)

    def _compute_rows(self, task: TensorTask, out_dtype: Any) -> Any:
        torch = self.torch
        per_row = task.numel // task.shape[0]
        step = max(1, ROW_CHUNK_NUMEL // max(1, per_row))
        out = torch.empty(task.shape, dtype=out_dtype)
        for r0 in range(0, task.shape[0], step):
            r1 = min(task.shape[0], r0 + step)
            loaded = {(mi, name): self._upcast(task, mi, name, rows=(r0, r1)) for mi, name in task.all_inputs()}
            part = self._call(task, loaded, out_dtype, shape=(r1 - r0, *task.shape[1:]))
            out[r0:r1].copy_(part)
            del loaded, part
        return out

    def _call(self, task: TensorTask, loaded: dict, out_dtype: Any, shape: Optional[tuple] = None) -> Any:
        torch = self.torch
        from adaptkit.merge.api import MergeInputs

        inputs = MergeInputs(
            name=task.out_name,
            tensors=[loaded[k] for k in task.inputs],
            base=loaded[task.base] if task.base is not None else None,
            params=task.params,
            global_params=task.global_params,
            models=[self.plan.models[mi].ref for mi, _ in task.inputs],
            seed=self.plan.seed,
            layer_index=task.layer_index,
        )
        # the upcast inputs are this call's own copies, read by nobody afterwards: built-in methods may
        # overwrite them (compute task vectors in place, write the result into the base tensor)
        inputs.owned = True  # type: ignore[attr-defined]
        result = self.fn(inputs)
        if not isinstance(result, torch.Tensor):
            raise CheckpointError(
                f"merge method {self.plan.method_name!r} returned {type(result).__name__} for tensor "
                f"{task.out_name!r}, not a tensor"
            )
        expected = shape if shape is not None else task.shape
        if tuple(result.shape) != tuple(expected):
            raise CheckpointError(
                f"merge method {self.plan.method_name!r} returned shape {list(result.shape)} for tensor "
                f"{task.out_name!r}, expected {list(expected)}"
            )
        if self._defer_check(task) and result.numel():
            total = float(result.sum(dtype=torch.float64) if result.dtype == torch.float64 else result.sum())
            if not math.isfinite(total):
                for (mi, name), t in loaded.items():
                    self._check_finite(t, mi, name)  # raises for a non-finite input; else an overflow
        self.stats.update(inputs.stats)
        # free the upcast inputs (every frame shares this dict) before the rounded copy is allocated
        loaded.clear()
        del inputs, loaded
        out = result.to(out_dtype)  # the one rounding
        del result
        if out.device.type != "cpu":
            out = out.to("cpu")
        return out.contiguous()


def tune_allocator() -> None:
    """Make fresh tensor memory cheap: the engine allocates and frees same-sized buffers for every tensor
    group, and first-touch page faults cost about as much as the math. glibc then serves blocks up to
    32 MiB from its heap and keeps freed ones for reuse instead of returning them to the kernel (measured:
    ~20 % fewer CPU seconds for a linear merge, a few MiB more peak)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 * 2**20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 512 * 2**20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def tune_openmp() -> None:
    """Let idle OpenMP workers sleep instead of spinning: between the engine's many short parallel regions
    (chunks of a few MiB) spinning workers burn CPU time that does no work, and on a shared machine they
    take it from other processes. Only effective before torch is first imported in the process; a value
    the user set (``OMP_WAIT_POLICY``) is kept."""
    import sys

    if "torch" in sys.modules:
        return
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _check_not_an_input(plan: MergePlan, out: Path) -> None:
    """OUT may not be, contain, or lie inside an input model folder (``--force`` would replace an input)."""
    target = out.resolve()
    folders = [m.path for m in plan.models] + ([plan.aux_source] if plan.aux_source is not None else [])
    for folder in folders:
        f = Path(folder).resolve()
        if target == f or f in target.parents or target in f.parents:
            raise OutputError(f"{out}: the output folder overlaps the input model folder {f}; choose another OUT")


def _trim_heap() -> None:
    """Return free heap memory to the kernel (glibc ``malloc_trim``); a no-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _set_threads(threads: Optional[int]) -> tuple[int, int]:
    import torch

    prev = torch.get_num_threads()
    n = threads if threads and threads > 0 else (os.cpu_count() or 1)
    torch.set_num_threads(n)
    return prev, n


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

    from adaptkit.io import ShardedWriter, TensorSpec, atomic_output_dir, check_output_target

    out = Path(out)
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"--device must be cpu or cuda, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda: CUDA is not available on this machine")
    check_output_target(out, force)
    _check_not_an_input(plan, out)
    t0 = time.perf_counter()
    prev_threads, n_threads = _set_threads(threads)
    ex = _Executor(plan, device)
    total = len(plan.tasks)
    total_bytes = plan.bytes_written
    try:
        with atomic_output_dir(out, force=force) as tmp:
            tmp = Path(tmp)
            specs = [TensorSpec(t.out_name, t.dtype, t.shape) for t in plan.tasks]
            writer = ShardedWriter(tmp, specs, max_shard_size=max_shard_size, metadata={"format": "pt"})
            try:
                _pipeline(ex, plan, writer, progress, total, total_bytes)
                files = writer.close()
            except BaseException:
                writer.abort()
                raise
            _write_aux(plan, tmp, ex.stats)
            names = sorted(p.name for p in tmp.iterdir())
    finally:
        torch.set_num_threads(prev_threads)
        ex.fadvise.close()
    del files
    return MergeResult(
        output=out,
        method=plan.method_name,
        tensors=total,
        bytes_read=plan.bytes_read,
        bytes_written=total_bytes,
        seconds=time.perf_counter() - t0,
        files=names,
        stats=dict(sorted(ex.stats.items())),
        excluded=len(plan.excluded),
        device=device,
        threads=n_threads,
        seed=plan.seed,
    )


def _pipeline(ex: _Executor, plan: MergePlan, writer: Any, progress: Optional[ProgressFn], total: int,
              total_bytes: int) -> None:
    tasks = plan.tasks
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


# --------------------------------------------------------------------------------------------------
# auxiliary outputs

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
NAMED_TEMPLATES = {"chatml": CHATML}


def _model_chat_template(path: Path) -> Optional[str]:
    j = path / "chat_template.jinja"
    if j.is_file():
        return j.read_text(encoding="utf-8")
    tc = path / "tokenizer_config.json"
    if tc.is_file():
        try:
            v = json.loads(tc.read_text(encoding="utf-8")).get("chat_template")
        except (ValueError, OSError):
            return None
        if isinstance(v, str):
            return v
    return None


def resolve_chat_template(plan: MergePlan) -> Optional[str]:
    ct = plan.config.chat_template
    if not ct:
        return None
    if ct == "auto":
        found = Counter(t for m in plan.models if m.path.is_dir() and (t := _model_chat_template(m.path)))
        if not found:
            raise ConfigError("chat_template: auto: none of the input models has a chat template")
        return found.most_common(1)[0][0]
    if ct in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[ct]
    if "{" in ct:
        return ct
    raise ConfigError(
        f"chat_template {ct!r} is not a Jinja template nor a known name (known: auto, {', '.join(NAMED_TEMPLATES)})"
    )


def _write_aux(plan: MergePlan, tmp: Path, stats: Counter) -> None:
    from adaptkit.io import copy_aux_files

    if plan.aux_source is not None:
        src = plan.aux_source
        if src.is_dir():
            copy_aux_files(src, tmp, config=False)
    if plan.out_config is not None:
        (tmp / "config.json").write_text(json.dumps(plan.out_config, indent=2, sort_keys=True) + "\n")
    template = resolve_chat_template(plan)
    if template is not None:
        (tmp / "chat_template.jinja").write_text(template, encoding="utf-8")
        tc = tmp / "tokenizer_config.json"
        if tc.is_file():
            try:
                data = json.loads(tc.read_text(encoding="utf-8"))
            except ValueError:
                data = None
            if isinstance(data, dict) and "chat_template" in data:
                data["chat_template"] = template
                tc.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    recipe = plan.resolved_yaml()
    (tmp / "mergekit_config.yml").write_text(recipe, encoding="utf-8")
    (tmp / "README.md").write_text(model_card(plan, recipe, stats), encoding="utf-8")


def model_card(plan: MergePlan, recipe: str, stats: Counter) -> str:
    from adaptkit import __version__

    models = "\n".join(
        f"* `{m.path}`" + (" (base)" if i == plan.base_index else "") for i, m in enumerate(plan.models)
    )
    stat_lines = "\n".join(f"* {k}: {v}" for k, v in sorted(stats.items())) or "* none"
    excl = ""
    if plan.excluded:
        reasons = Counter(r for _, _, r in plan.excluded)
        excl = "\n### Input tensors left out\n\n" + "\n".join(f"* {n} — {r}" for r, n in sorted(reasons.items())) + "\n"
    return f"""---
library_name: transformers
tags:
- merge
- adaptkit
---
# Merged model

This model was merged with adaptkit {__version__} using the
`{plan.method_name}` merge method (fp32 math, rounded once to the output dtype; seed {plan.seed}).

### Models merged

{models}

### Configuration

```yaml
{recipe.rstrip()}
```

### Merge statistics

* output tensors: {len(plan.tasks)}
{stat_lines}
{excl}"""


def merge(
    config: Any,
    out: str | os.PathLike[str],
    *,
    registry: Any = None,
    seed: int = 0,
    allow_pickle: bool = False,
    device: str = "cpu",
    threads: Optional[int] = None,
    max_shard_size: int = 5 * 2**30,
    force: bool = False,
    progress: Optional[ProgressFn] = None,
) -> MergeResult:
    """One call for library users and ``adaptkit run``: ``config`` is a YAML path, a mapping, or a
    :class:`~adaptkit.config.MergeConfig`; ``registry`` defaults to the plugin host's mergers. Relative
    model paths resolve against the YAML file's folder (the working directory for a mapping)."""
    from adaptkit.config import MergeConfig, load_merge_config, parse_merge_config
    from adaptkit.merge.plan import build_plan

    config_path: Optional[Path] = None
    if isinstance(config, (str, os.PathLike)):
        config_path = Path(config)
        cfg = load_merge_config(config_path)
    elif isinstance(config, MergeConfig):
        cfg = config
    else:
        cfg = parse_merge_config(config)
    if registry is None:
        from adaptkit.plugins import get_plugin_manager

        registry = get_plugin_manager().mergers
    plan = build_plan(cfg, config_path, registry, seed=seed, allow_pickle=allow_pickle)
    try:
        return run_merge(plan, out, device=device, threads=threads, max_shard_size=max_shard_size, force=force,
                         progress=progress)
    finally:
        plan.close()
