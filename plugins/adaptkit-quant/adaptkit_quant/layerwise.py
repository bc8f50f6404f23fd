"""Streaming a decoder-only model one decoder layer at a time, for calibration-based quantizers.

``LayerwiseModel`` builds the transformers model on the ``meta`` device (no memory), materializes only the
modules *before* the decoder layers (embeddings, rotary tables) from the safetensors checkpoint, and runs
the calibration token ids through them with decoder layer 0 replaced by a catcher that records the hidden
states and the exact keyword arguments the model passes to its layers (attention mask, position ids,
rotary cos/sin). From then on a quantizer loads one layer at a time (``load_layer``), runs the recorded
inputs through it, and ``advance`` replaces the inputs by the layer's outputs before ``unload_layer`` puts
it back on ``meta``. Peak memory: one layer in fp32 plus the calibration activations.

``run_sequential_groups`` finds, with one discovery forward, which target linears share an input tensor
(q/k/v; gate/up) and in which order groups run (q/k/v, o, gate/up, down for Llama-like layers; any layer
structure works; found once per layer class), then collects each group's Hessian with the earlier groups
already quantized ("true sequential" GPTQ), stopping the forward just before the group's modules run.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from adaptkit.errors import CheckpointError, ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import torch

DEFAULT_BATCH_TOKENS = 4096


class _Stop(Exception):
    """Raised inside a forward to stop it once everything needed has run."""


class PhaseTimer:
    """Adds the wall seconds of a ``with`` block to ``phases[name]`` (nested blocks of the same name are
    counted once)."""

    def __init__(self, phases: dict[str, float], name: str) -> None:
        self.phases, self.name = phases, name

    def __enter__(self) -> None:
        import time

        self.t0 = time.perf_counter()

    def __exit__(self, *exc: Any) -> None:
        import time

        self.phases[self.name] = self.phases.get(self.name, 0.0) + time.perf_counter() - self.t0


def _set_tensor(root: Any, dotted: str, tensor: "torch.Tensor", *, buffer: bool = False) -> None:
    import torch

    mod_name, _, attr = dotted.rpartition(".")
    mod = root.get_submodule(mod_name) if mod_name else root
    if attr in mod._parameters:
        mod._parameters[attr] = torch.nn.Parameter(tensor, requires_grad=False)
    elif attr in mod._buffers:
        mod._buffers[attr] = tensor
    else:  # pragma: no cover - callers only pass existing names
        raise KeyError(dotted)


def resolve_device(device: str | None) -> "torch.device":
    import torch

    dev = torch.device(device or "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: CUDA is not available on this machine (torch.cuda.is_available() is False)")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device}: expected cpu or cuda")
    return dev


class LayerwiseModel:
    """A meta-device transformers model whose decoder layers are loaded one at a time (see module doc)."""

    def __init__(self, model_dir: str | Path, checkpoint: Any, *, device: str = "cpu",
                 config: dict[str, Any] | None = None) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        self.model_dir = Path(model_dir)
        self.checkpoint = checkpoint
        self.device = resolve_device(device)
        self.dtype = torch.float32
        # the config as the loader presents it (a GGUF file has no config.json; a quantized folder's config
        # without quantization_config), else config.json beside the weights
        config = config if config is not None else getattr(checkpoint, "config", None)
        try:
            if config is not None:
                cfg = {k: v for k, v in config.items() if k not in ("quantization_config", "model_type")}
                self.config = AutoConfig.for_model(config.get("model_type", "llama"), **cfg)
            else:
                self.config = AutoConfig.from_pretrained(str(self.model_dir), local_files_only=True)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{self.model_dir}: cannot read the model config ({type(e).__name__}: {e})") from None
        try:
            with torch.device("meta"):
                self.model = AutoModelForCausalLM.from_config(self.config, dtype=torch.float32, attn_implementation="sdpa")
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(
                f"{self.model_dir}: transformers cannot build a causal LM for model_type "
                f"{getattr(self.config, 'model_type', '?')!r} ({type(e).__name__}: {e})"
            ) from None
        self.model.eval()
        self.base = self.model.base_model
        self.layers, self.prefix = self._find_layers()
        self.num_layers = len(self.layers)
        self.inps: list["torch.Tensor"] = []
        self.kwargs: list[dict[str, Any]] = []
        self.phases: dict[str, float] = {}  #: seconds per phase (``timed``); the runner reports them in --json

    def timed(self, phase: str) -> "PhaseTimer":
        """``with lw.timed("forward"): ...`` adds the block's wall seconds to ``lw.phases[phase]``."""
        return PhaseTimer(self.phases, phase)

    # -- construction ------------------------------------------------------------------------------------
    @classmethod
    def from_request(cls, request: Any, *, batch_tokens: int = DEFAULT_BATCH_TOKENS) -> "LayerwiseModel":
        checkpoint = request.checkpoint
        own = None
        if checkpoint is None:
            from adaptkit.io import open_checkpoint

            checkpoint = own = open_checkpoint(request.model_dir)
        lw = cls(request.model_dir, checkpoint, device=request.device, config=request.config)
        lw._own_checkpoint = own
        phases = getattr(request, "phases", None)
        if isinstance(phases, dict):
            lw.phases = phases  # the runner's dict: --json prints it
        with lw.timed("calibration_text"):
            tokenizer = request.tokenizer()
            ids = request.calibration_ids(tokenizer)
        request.report(f"calibration: {ids.shape[0]} samples x {ids.shape[1]} tokens ({request.calib})")
        with lw.timed("embed"):
            lw.catch_inputs(ids, batch_tokens=batch_tokens)
        return lw

    def _find_layers(self) -> tuple[Any, str]:
        import torch

        n = int(getattr(self.config, "num_hidden_layers", 0) or 0)
        best = None
        for name, mod in self.model.named_modules():
            if isinstance(mod, torch.nn.ModuleList) and len(mod) == n and n > 0:
                if best is None or name.count(".") < best[1].count("."):
                    best = (mod, name)
        if best is None:
            raise CheckpointError(
                f"{self.model_dir}: cannot find the {n} decoder layers of model_type "
                f"{getattr(self.config, 'model_type', '?')!r}"
            )
        return best

    def _key(self, name: str) -> str:
        return name

    def _materialize_outside_layers(self) -> None:
        """Load every parameter outside the decoder layers and the LM head that the checkpoint has, and
        rebuild rotary-embedding modules (their tables are non-persistent buffers)."""
        import torch

        names = set(self.checkpoint.names())
        lp = self.prefix + "."
        for name, p in list(self.model.named_parameters()):
            if name.startswith(lp) or name.startswith("lm_head"):
                continue
            if name in names:
                _set_tensor(self.model, name, self.checkpoint.get(name).to(device=self.device, dtype=torch.float32))
        for name, buf in list(self.model.named_buffers()):
            if name.startswith(lp):
                continue
            if name in names:
                _set_tensor(self.model, name, self.checkpoint.get(name).to(device=self.device, dtype=torch.float32), buffer=True)
        for name, mod in list(self.model.named_modules()):
            if name.startswith(lp) or not name:
                continue
            if "inv_freq" in getattr(mod, "_buffers", {}) and mod._buffers["inv_freq"].is_meta:
                with torch.device("cpu"):
                    new = type(mod)(config=self.config)
                parent_name, _, attr = name.rpartition(".")
                parent = self.model.get_submodule(parent_name) if parent_name else self.model
                setattr(parent, attr, new.to(self.device))

    def catch_inputs(self, ids: "torch.Tensor", *, batch_tokens: int = DEFAULT_BATCH_TOKENS) -> None:
        """Run ``ids [n, seqlen]`` up to decoder layer 0 and record its inputs (batched)."""
        import torch

        self._materialize_outside_layers()
        n, seqlen = ids.shape
        bsz = max(1, batch_tokens // max(1, seqlen))
        first = self.layers[0]
        recorded: list[tuple["torch.Tensor", dict[str, Any]]] = []

        class Catcher(torch.nn.Module):
            def __init__(self, inner: Any) -> None:
                super().__init__()
                self.inner = inner
                for attr in ("attention_type", "layer_idx", "is_sliding"):
                    if hasattr(inner, attr):
                        setattr(self, attr, getattr(inner, attr))

            def forward(self, hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
                if args:
                    raise CheckpointError("decoder layers called with positional arguments are not supported")
                kwargs = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "past_key_value")}
                kwargs["use_cache"] = False
                recorded.append((hidden_states.detach(), kwargs))
                raise _Stop

        self.layers[0] = Catcher(first)
        try:
            with torch.no_grad():
                for b0 in range(0, n, bsz):
                    batch = ids[b0:b0 + bsz].to(self.device)
                    try:
                        self.base(input_ids=batch, use_cache=False)
                    except _Stop:
                        pass
                    else:  # pragma: no cover - the catcher always raises
                        raise CheckpointError("calibration forward did not reach decoder layer 0")
        finally:
            self.layers[0] = first
        self.inps = [h for h, _ in recorded]
        self.kwargs = [kw for _, kw in recorded]

    # -- one layer at a time -----------------------------------------------------------------------------
    def layer_prefix(self, idx: int) -> str:
        return f"{self.prefix}.{idx}"

    def load_layer(self, idx: int) -> Any:
        """Decoder layer ``idx`` on the device with its fp32 weights from the checkpoint."""
        with self.timed("load"):
            return self._load_layer(idx)

    def _load_layer(self, idx: int) -> Any:
        import torch

        layer = self.layers[idx]
        pre = self.layer_prefix(idx) + "."
        names = set(self.checkpoint.names())
        for name, _ in list(layer.named_parameters()):
            key = pre + name
            if key not in names:
                raise CheckpointError(f"{self.model_dir}: tensor {key!r} is missing from the checkpoint")
            _set_tensor(layer, name, self.checkpoint.get(key).to(device=self.device, dtype=torch.float32).clone())
        for name, buf in list(layer.named_buffers()):
            key = pre + name
            if key in names:
                _set_tensor(layer, name, self.checkpoint.get(key).to(device=self.device, dtype=torch.float32).clone(), buffer=True)
            elif buf.is_meta:
                raise CheckpointError(f"{self.model_dir}: decoder layer buffer {key!r} is not in the checkpoint")
        layer.eval()
        return layer

    def unload_layer(self, idx: int) -> None:
        self.layers[idx].to("meta")

    def linear_names(self, idx: int) -> list[str]:
        """Full names (``model.layers.3.self_attn.q_proj``) of the ``nn.Linear`` modules of layer ``idx``."""
        import torch

        pre = self.layer_prefix(idx)
        return [f"{pre}.{n}" for n, m in self.layers[idx].named_modules() if isinstance(m, torch.nn.Linear)]

    def modules(self, idx: int) -> dict[str, Any]:
        pre = self.layer_prefix(idx)
        return {f"{pre}.{n}": m for n, m in self.layers[idx].named_modules() if n}

    def forward_layer(self, layer: Any, h: "torch.Tensor", kw: dict[str, Any]) -> "torch.Tensor":
        out = layer(h, **kw)
        return out[0] if isinstance(out, (tuple, list)) else out

    def advance(self, idx: int, layer: Any) -> None:
        """Replace the recorded inputs by layer ``idx``'s outputs (the next layer's inputs)."""
        import torch

        with torch.no_grad():
            self.inps = [self.forward_layer(layer, h, kw) for h, kw in zip(self.inps, self.kwargs)]

    def close(self) -> None:
        own = getattr(self, "_own_checkpoint", None)
        if own is not None:
            own.close()


# ---------------------------------------------------------------------------------------------------------
# true-sequential groups
# ---------------------------------------------------------------------------------------------------------
def discover_groups(lw: LayerwiseModel, idx: int, layer: Any, targets: list[str]) -> list[list[str]]:
    """Targets of layer ``idx`` grouped by shared input tensor, groups in first-execution order.

    Targets that did not run on the first calibration batch form singleton groups at the end. The answer
    depends only on the layer's code and which of its linears are targets, so it is computed with one
    forward for the first layer of each (class, relative target names) and reused for the others.
    """
    import torch

    pre = lw.layer_prefix(idx) + "."
    rel = tuple(t[len(pre):] if t.startswith(pre) else t for t in targets)
    key = (type(layer).__module__, type(layer).__qualname__, rel)
    cache = lw.__dict__.setdefault("_group_cache", {})
    if key in cache:
        return [[pre + n for n in g] for g in cache[key]]

    mods = lw.modules(idx)
    order: list[tuple[str, int]] = []
    keep: list[Any] = []
    hooks = []

    def make_hook(name: str) -> Callable[..., None]:
        def hook(_m: Any, inp: tuple[Any, ...], _out: Any) -> None:
            keep.append(inp[0])
            order.append((name, id(inp[0])))

        return hook

    for name in targets:
        hooks.append(mods[name].register_forward_hook(make_hook(name)))
    try:
        with torch.no_grad():
            lw.forward_layer(layer, lw.inps[0], lw.kwargs[0])
    finally:
        for h in hooks:
            h.remove()
    groups: dict[int, list[str]] = {}
    for name, key_ in order:
        g = groups.setdefault(key_, [])
        if name not in g:
            g.append(name)
    result = list(groups.values())
    seen = {n for g in result for n in g}
    result += [[n] for n in targets if n not in seen]
    del keep
    cache[key] = [[n[len(pre):] if n.startswith(pre) else n for n in g] for g in result]
    return result


# ---------------------------------------------------------------------------------------------------------
# Hessian accumulation
# ---------------------------------------------------------------------------------------------------------
class HessianAccumulator:
    """``H = 2/n · Σ x xᵀ`` over all calibration tokens fed through ``add`` (float64 sum)."""

    def __init__(self, columns: int, device: Any = "cpu") -> None:
        import torch

        self.columns = columns
        self.sum = torch.zeros(columns, columns, dtype=torch.float64, device=device)
        self.n = 0

    def add(self, x: "torch.Tensor") -> None:
        import torch

        x = x.detach().reshape(-1, x.shape[-1]).to(device=self.sum.device, dtype=torch.float32)
        if x.shape[1] != self.columns:
            raise ValueError(f"HessianAccumulator: expected {self.columns} input features, got {x.shape[1]}")
        self.sum += (x.T @ x).to(torch.float64)
        self.n += int(x.shape[0])

    def hessian(self) -> "torch.Tensor":
        if self.n == 0:
            raise ValueError("HessianAccumulator: no calibration tokens were seen")
        return self.sum * (2.0 / self.n)



GroupFn = Callable[[list[str], "torch.Tensor", dict[str, Any]], dict[str, tuple[Any, "torch.Tensor"]]]


def collect_hessians(lw: LayerwiseModel, idx: int, layer: Any, input_sets: list[list[str]]) -> dict[int, "torch.Tensor"]:
    """Hessians ``2/n Σ x xᵀ`` of the inputs of each input set (keyed by position), from all batches.

    Forward *pre*-hooks take each set's input when the first of its modules is about to run (its members
    share that tensor), and the forward stops as soon as every set has its input -- before those modules
    compute anything. A set whose modules never run gets the identity (no calibration information: plain
    rounding)."""
    import torch

    mods = lw.modules(idx)
    accs = {}
    seen: set[int] = set()
    hooks = []

    def make_hook(k: int) -> Callable[..., None]:
        def hook(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if k in seen:
                return
            x = args[0] if args else kwargs.get("input")
            accs[k].add(x)
            seen.add(k)
            if len(seen) == len(input_sets):
                raise _Stop

        return hook

    for k, s in enumerate(input_sets):
        accs[k] = HessianAccumulator(mods[s[0]].in_features, device=lw.device)
        for name in s:
            hooks.append(mods[name].register_forward_pre_hook(make_hook(k), with_kwargs=True))
    try:
        with torch.no_grad():
            for h, kw in zip(lw.inps, lw.kwargs):
                seen.clear()
                try:
                    lw.forward_layer(layer, h, kw)
                except _Stop:
                    pass
    finally:
        for hk in hooks:
            hk.remove()
    out = {}
    for k, acc in accs.items():
        if acc.n == 0:
            out[k] = torch.eye(acc.columns, dtype=torch.float64, device=lw.device)
        else:
            out[k] = acc.hessian()
    return out


def run_sequential_groups(
    lw: LayerwiseModel, idx: int, layer: Any, targets: list[str], fn: GroupFn, *, true_sequential: bool = True,
    advance: bool = False,
) -> list[tuple[str, Any]]:
    """Quantize ``targets`` of layer ``idx`` group by group with ``fn(names, H, modules)`` (see module doc).

    ``fn`` returns ``{name: (result, W_hat)}``; ``W_hat`` replaces the module's weight before the next
    group's Hessian is collected. Returns ``[(name, result)]`` in quantization order.

    ``advance=True``: also replace ``lw.inps`` by the quantized layer's outputs (what ``lw.advance`` gives).
    With true-sequential groups this costs **one** forward of the layer per calibration batch in all
    (:class:`_PausedForwards`): each batch's forward pauses where a group's modules are about to run, the group
    is quantized from the inputs of all batches, and the forwards resume with its quantized weights. The
    arithmetic is the same as one stopped forward per group plus a full forward at the end.
    """
    import torch

    if not targets:
        if advance:
            with lw.timed("forward"):
                lw.advance(idx, layer)
        return []
    sets = discover_groups(lw, idx, layer, targets)
    mods = lw.modules(idx)
    results: list[tuple[str, Any]] = []

    def quantize_set(s: list[str], H: "torch.Tensor") -> None:
        out = fn(s, H, mods)
        for name in s:
            res, w_hat = out[name]
            with torch.no_grad():
                mods[name].weight.data = w_hat.to(device=mods[name].weight.device, dtype=mods[name].weight.dtype)
            results.append((name, res))

    if not true_sequential:
        hs = collect_hessians(lw, idx, layer, sets)
        for k, s in enumerate(sets):
            quantize_set(s, hs[k])
        del hs
        if advance:
            with lw.timed("forward"):
                lw.advance(idx, layer)
        return results

    paused = _PausedForwards(lw, layer, sets, mods)
    try:
        for k, s in enumerate(sets):
            acc = HessianAccumulator(mods[s[0]].in_features, device=lw.device)
            for x in paused.inputs_of(k):
                with lw.timed("hessian"):
                    acc.add(x)
                del x
            if acc.n == 0:
                H = torch.eye(acc.columns, dtype=torch.float64, device=lw.device)
            else:
                H = acc.hessian()
            del acc
            quantize_set(s, H)
            del H
        outs = paused.finish() if advance else None
    finally:
        paused.close()
    if advance:
        lw.inps = outs
    return results


class _PausedForwards:
    """One forward of ``layer`` per calibration batch, each in its own thread, paused at forward *pre*-hooks
    just before the first module of input set ``k`` runs (its members share that input).

    Exactly one thread runs at a time (a baton passed with semaphores), so the torch operations execute in
    the same order and with the same thread settings as sequential code. ``inputs_of(k)`` resumes the
    batches in order until each reaches set ``k`` and yields their inputs (a batch whose forward never runs
    set ``k`` yields nothing); ``finish()`` resumes them to the end and returns the outputs. A batch that
    finished before the last set was quantized (a set it never runs comes after it) is run again at the end,
    so its output always comes from the fully quantized layer.
    """

    def __init__(self, lw: LayerwiseModel, layer: Any, sets: list[list[str]], mods: dict[str, Any]) -> None:
        import threading

        self.lw = lw
        self.layer = layer
        self.n_sets = len(sets)
        self.quantized = -1  # sets 0..quantized have their final weights
        self.workers = [_Worker(self, b) for b in range(len(lw.inps))]
        self.hooks = []
        self.local = threading.local()
        for k, s in enumerate(sets):
            for name in s:
                self.hooks.append(mods[name].register_forward_pre_hook(self._hook(k), with_kwargs=True))

    def _hook(self, k: int) -> Callable[..., None]:
        def hook(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            w = getattr(self.local, "worker", None)
            if w is None or k in w.seen:  # not one of our forwards, or the set's input was already taken
                return
            w.seen.add(k)
            if k <= self.quantized:
                return  # nothing to wait for (a set that ran again)
            x = args[0] if args else kwargs.get("input")
            w.pause(("input", k, x))

        return hook

    def inputs_of(self, k: int) -> Any:
        for w in self.workers:
            while not w.done and w.at is None or (w.at is not None and w.at < k):
                w.resume()
            if w.at == k:
                x = w.x
                w.x = None
                yield x
        self.quantized = k

    def finish(self) -> list["torch.Tensor"]:
        outs = []
        for w in self.workers:
            while not w.done:
                w.resume()
            if w.error is not None:
                raise w.error
            if w.finished_at < self.n_sets - 1:
                import torch

                with torch.no_grad(), self.lw.timed("forward"):
                    w.out = self.lw.forward_layer(self.layer, self.lw.inps[w.b], self.lw.kwargs[w.b])
            outs.append(w.out)
            w.out = None
        return outs

    def close(self) -> None:
        for w in self.workers:
            w.abort()
        for h in self.hooks:
            h.remove()


class _Worker:
    """One paused forward (see :class:`_PausedForwards`)."""

    def __init__(self, owner: _PausedForwards, b: int) -> None:
        import threading

        self.owner = owner
        self.b = b
        self.go = threading.Semaphore(0)
        self.back = threading.Semaphore(0)
        self.thread = None
        self.seen: set[int] = set()
        self.at = None  # the set whose input this worker is paused at
        self.x = None
        self.out = None
        self.done = False
        self.error = None
        self.finished_at = -1
        self.stop = False

    def _run(self) -> None:
        import torch

        self.owner.local.worker = self
        self.go.acquire()
        try:
            if not self.stop:
                lw = self.owner.lw
                with torch.no_grad():
                    self.out = lw.forward_layer(self.owner.layer, lw.inps[self.b], lw.kwargs[self.b])
        except _Stop:
            pass
        except BaseException as e:  # noqa: BLE001 - handed to the coordinating thread
            self.error = e
        self.finished_at = self.owner.quantized
        self.done = True
        self.at = None
        self.back.release()

    def pause(self, what: tuple[str, int, Any]) -> None:
        _, k, x = what
        self.at, self.x = k, x
        self.back.release()
        self.go.acquire()
        self.at = None
        if self.stop:
            raise _Stop

    def resume(self) -> None:
        import threading

        if self.done:
            return
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name=f"adaptkit-layer-batch-{self.b}", daemon=True)
            self.thread.start()
        with self.owner.lw.timed("forward"):
            self.go.release()
            self.back.acquire()
        if self.error is not None:
            err, self.error = self.error, None
            raise err

    def abort(self) -> None:
        if self.thread is not None and not self.done:
            self.stop = True
            self.go.release()
            self.back.acquire()
        if self.thread is not None:
            self.thread.join()
