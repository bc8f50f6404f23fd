"""``merge-adapter``: PEFT adapters merged into a base (a full model), or several LoRA adapters merged into one
LoRA adapter (``--into-adapter``). Both stream one tensor (one module) at a time and publish through
``adaptkit.io.publish.publish_output``. Semantics: specs/adapters.md.
"""
from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from adaptkit.errors import CheckpointError, ConfigError


def _progress(total: int, desc: str, unit: str, enabled: bool) -> Any:
    from adaptkit.progress import Progress

    return Progress(total, desc, unit=unit, enabled=enabled)


def _fmt_bytes(n: int) -> str:
    from adaptkit.io import format_size

    return format_size(n)


# -- adapters into weights -------------------------------------------------------------------------------------


def merge_into_weights(host: Any, base: str | Path, adapters: Sequence[str | Path], out: str | Path, *,
                       weights: Sequence[float] | None = None, dtype: str | None = None, device: str = "cpu",
                       base_quantization: Any = None, force: bool = False, max_shard_size: int | None = None,
                       progress: bool = True) -> dict[str, Any]:
    """Merge ``adapters`` into ``base`` and write the full model to ``out``; returns the JSON summary."""
    from adaptkit.adapters.view import AdaptedCheckpoint
    from adaptkit.io import ShardedWriter, TensorSpec, check_output_target
    from adaptkit.io.publish import publish_output
    from adaptkit.io.writer import DEFAULT_MAX_SHARD_SIZE

    t0 = time.perf_counter()
    check_output_target(out, force)
    ckpt = host.open_model(base)
    view = None
    pool = None
    try:
        view = AdaptedCheckpoint(ckpt, list(adapters), weights, base_quantization=base_quantization, dtype=dtype,
                                 device=device)
        # the base's sha256 (provenance) is computed in the background while the merge runs
        pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="merge-adapter")
        ident_future = pool.submit(view.identity, hash_files=True)
        names = view.names()
        specs = [TensorSpec(n, view.info(n).dtype, tuple(view.info(n).shape)) for n in names]
        changed = set(view.changed())
        total_bytes = sum(s.nbytes for s in specs)
        title = f"{Path(base).name} + " + " + ".join(Path(a).name for a in adapters)
        with publish_output(out, kind="merge-adapter", force=force, title=title) as pub:
            done_bytes = 0
            with ShardedWriter(pub.path, specs, max_shard_size=max_shard_size or DEFAULT_MAX_SHARD_SIZE) as writer, \
                    _progress(len(specs), "merging adapters", "tensors", progress) as bar:
                # one tensor computed ahead while the previous one is written
                # one tensor computed ahead while the previous one is written; numpy (no torch import) where the
                # math is plain LoRA on a safetensors base, torch otherwise; reads use pread (nothing stays mapped)
                ahead = pool.submit(_compute, view, specs[0].name) if specs else None
                for i, spec in enumerate(specs):
                    data, is_bytes = ahead.result()
                    ahead = pool.submit(_compute, view, specs[i + 1].name) if i + 1 < len(specs) else None
                    if is_bytes:
                        writer.write_bytes(spec.name, data)
                    else:
                        writer.write(spec.name, data)
                    del data
                    done_bytes += spec.nbytes
                    bar.advance(status=f"{_fmt_bytes(done_bytes)} / {_fmt_bytes(total_bytes)}")
            ident = ident_future.result()
            notes = list(view.notes) + view.base_hash_notes(ident["base"].get("sha256") or {})
            pub.copy_aux(view)
            cfg = view.config
            if cfg is not None:
                pub.write_json("config.json", cfg)
            doc = {
                "mode": "into-weights",
                "output": str(out),
                "tensors": len(specs),
                "changed_tensors": len(changed),
                "bytes_written": total_bytes,
                "dtype": dtype or "auto",
                "device": device,
                **ident,
                "notes": notes,
            }
            pub.provenance.update({k: v for k, v in doc.items() if k not in ("output",)})
            pub.tags += ["peft", "lora-merge"]
            pub.summary.append(
                f"Base `{base}` with {len(view.adapters)} PEFT adapter(s) merged into its weights by "
                "`adaptkit merge-adapter` (fp32 math, rounded once to the output dtype).")
            pub.sections["Base"] = _base_section(ident["base"])
            pub.sections["Adapters"] = _adapters_table(ident["adapters"])
            bq = ident["base_quantization"]
            if bq.get("quant_type", "none") != "none":
                applied = ident["base_quantization_applied"]
                pub.sections["QLoRA base"] = (
                    f"The adapters were trained on a {bq['quant_type']}-quantized base ({bq.get('source')}); "
                    + (f"{ident['roundtrip_tensors']} linear weights were round-tripped through bitsandbytes "
                       f"(blocksize {bq.get('blocksize')}, double quant {bq.get('double_quant')}) before merging, so "
                       "this model reproduces the adapter model." if applied else
                       "the base is stored in that format already; its dequantized weights were used."))
            if notes:
                pub.sections["Notes"] = "\n".join(f"* {n}" for n in notes)
        doc["seconds"] = round(time.perf_counter() - t0, 3)
        return doc
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if view is not None:
            view.close()
        ckpt.close()


def _compute(view: Any, name: str) -> tuple[Any, bool]:
    data = view.fast_bytes(name)
    if data is not None:
        return data, True
    return view.get(name, copy=True), False


def _base_section(base: dict[str, Any]) -> str:
    lines = [f"* path: `{base['path']}` (loader {base.get('loader')}"
             + (f", dequantized from {base['source_format']}" if base.get("source_format") else "") + ")"]
    for f, h in sorted((base.get("sha256") or {}).items()):
        lines.append(f"* `{f}`: sha256 `{h}`")
    return "\n".join(lines)


def _adapters_table(ads: list[dict[str, Any]]) -> str:
    rows = ["| adapter | type | ranks | weight | sha256 |", "|---|---|---|---|---|"]
    for a in ads:
        rows.append(f"| `{a['path']}` | {a['kind']} | {','.join(map(str, a['ranks'])) or '-'} | {a['weight']:g} | "
                    f"`{(a.get('sha256') or '')[:16]}` |")
    return "\n".join(rows)


# -- adapters into one adapter -------------------------------------------------------------------------------


@dataclass
class _Slot:
    """One module of the merged adapter: which input adapters have it."""

    name: str
    kind: str  # linear | embedding
    members: list[tuple[int, Any]] = field(default_factory=list)  # (adapter index, LoraModule)


def _layer_index(name: str) -> int | None:
    m = re.search(r"\.(?:layers|h|blocks|layer)\.(\d+)\.", f".{name}.")
    return int(m.group(1)) if m else None


def _method_params(comp: Any, options: dict[str, Any], weights: Sequence[float]) -> tuple[list[dict], dict]:
    """Per-model and global parameters of a merge method, from ``-o KEY=VALUE`` options and ``--weights``."""
    per_model: list[dict[str, Any]] = []
    glob: dict[str, Any] = {}
    declared = {p.name for p in comp.params}
    for i, w in enumerate(weights):
        given = dict(options)
        if "weight" in declared:
            given["weight"] = float(w)
        resolved = comp.resolve_options(given, where=f"merge method {comp.name}")
        per_model.append({p.name: resolved[p.name] for p in comp.params if p.scope in ("model", "both")})
        if i == 0:
            glob = {p.name: resolved[p.name] for p in comp.params if p.scope in ("global", "both")}
    return per_model, glob


def merge_into_adapter(host: Any, base: str | Path, adapters: Sequence[str | Path], out: str | Path, *,
                       method: str = "linear", options: dict[str, Any] | None = None,
                       weights: Sequence[float] | None = None, rank: int | None = None, exact: bool = False,
                       oversample: int = 10, niter: int = 2, seed: int = 0, device: str = "cpu",
                       dtype: str | None = None, assume_same_base: bool = False, force: bool = False,
                       progress: bool = True) -> dict[str, Any]:
    """Merge several LoRA adapters of one base into one LoRA adapter (see specs/adapters.md, "Adapter merge").

    For every module: ``dW_i = s_i B_i A_i`` (zero where adapter ``i`` has no LoRA), combined with the registered
    merge ``method`` (``MergeInputs`` with a zero base and the ``dW_i`` as tensors), then factored back to rank
    ``rank`` by a truncated SVD. Full copies (``modules_to_save``, trained biases) are merged the same way, on
    their task vectors ``S_i - W`` (zero where an adapter has no copy), and saved as ``W + merged``.
    """
    import torch

    from adaptkit.adapters import math as am
    from adaptkit.adapters import qlora
    from adaptkit.formats import peft as fmt
    from adaptkit.io import check_output_target
    from adaptkit.io.publish import file_sha256, publish_output
    from adaptkit.merge.api import MergeInputs, tensor_seed

    t0 = time.perf_counter()
    if len(adapters) < 1:
        raise ConfigError("--into-adapter needs at least one adapter")
    comp = host.mergers.get(method)  # ConfigError naming the known methods
    if len(adapters) < comp.min_models or (comp.max_models is not None and len(adapters) > comp.max_models):
        most = f" and at most {comp.max_models}" if comp.max_models is not None else ""
        raise ConfigError(f"merge method {comp.name!r} takes at least {comp.min_models}{most} adapters, got {len(adapters)}")
    weights = [1.0] * len(adapters) if weights is None else [float(w) for w in weights]
    if len(weights) != len(adapters):
        raise ConfigError(f"--weights: {len(weights)} weight(s) for {len(adapters)} adapter(s); give one per adapter")
    per_model, glob = _method_params(comp, dict(options or {}), weights)
    impl = comp.load()
    out_code = None
    if dtype:
        from adaptkit.adapters.view import dtype_code_of

        out_code = dtype_code_of(dtype)
    check_output_target(out, force)

    ads: list[Any] = []
    ckpt = None
    try:
        for a in adapters:
            ads.append(fmt.read_adapter(a))
        ckpt = host.open_model(base)
        for ad in ads:
            if ad.peft_type != "LORA" or ad.use_dora:
                raise ConfigError(f"{ad.path}: only plain LoRA/rsLoRA adapters can be merged into one adapter "
                                  f"({ad.kind} deltas depend on the base weights); merge it into the base instead")
            if any(m.bias_key for m in ad.modules.values()):
                raise ConfigError(f"{ad.path}: lora_bias adapters cannot be merged into one adapter")
        ffo = {ad.fan_in_fan_out for ad in ads}
        if len(ffo) > 1:
            raise ConfigError("the adapters disagree on fan_in_fan_out; they were made for different model code")
        fan_in_fan_out = ffo.pop()
        ranks = sorted({r for ad in ads for r in ad.ranks})
        if not ranks:
            raise ConfigError("the adapters hold no LoRA matrices (only full copies); nothing to factor into a LoRA")
        if rank is None:
            if len(ranks) > 1:
                desc = ", ".join(f"{ad.path.name}: r={'/'.join(map(str, ad.ranks))}" for ad in ads)
                raise ConfigError(f"the adapters have different ranks ({desc}); pass --rank R to choose the merged rank")
            rank = ranks[0]
        if rank < 1:
            raise ConfigError(f"--rank must be a positive integer, got {rank}")
        if not assume_same_base:
            _check_same_base(ads)
        policy = qlora.resolve_policy(ads, None)

        # validate every adapter against the base (shapes, names): the view does it without reading data
        from adaptkit.adapters.view import AdaptedCheckpoint

        for ad in ads:
            AdaptedCheckpoint(ckpt, [ad], base_quantization=qlora.NONE)

        slots: dict[str, _Slot] = {}
        for i, ad in enumerate(ads):
            for mod in ad.modules.values():
                s = slots.setdefault(mod.name, _Slot(mod.name, mod.kind))
                if s.kind != mod.kind:
                    raise ConfigError(f"{ad.path}: {mod.name} is a {mod.kind} LoRA here but a {s.kind} LoRA in another adapter")
                s.members.append((i, mod))
        saved: dict[str, dict[int, str]] = {}
        for i, ad in enumerate(ads):
            for tname, key in ad.replacements.items():
                saved.setdefault(tname, {})[i] = key

        base_ident = {"path": str(base), "loader": getattr(ckpt, "loader", None),
                      "source_format": getattr(ckpt, "source_format", None), "sha256": file_sha256(list(ckpt.files))}
        title = " ⊕ ".join(Path(a).name for a in adapters)
        cdev = device
        tensors: dict[str, Any] = {}
        report: dict[str, dict[str, Any]] = {}
        with publish_output(out, kind="merge-adapter", force=force, title=f"{title} ({comp.name}, rank {rank})") as pub:
            with _progress(len(slots) + len(saved), f"merging {len(ads)} adapters", "modules", progress) as bar:
                for name in sorted(slots):
                    slot = slots[name]
                    deltas = []
                    shape = None
                    have = {i: m for i, m in slot.members}
                    for i, ad in enumerate(ads):
                        m = have.get(i)
                        if m is None:
                            deltas.append(None)
                            continue
                        a = ad.get(m.a_key).to(device=cdev, dtype=torch.float32)
                        b = ad.get(m.b_key).to(device=cdev, dtype=torch.float32)
                        d = am.lora_delta(a, b, m.scaling, transpose=False)  # [out, in] / [dim, num_embeddings]
                        shape = tuple(d.shape)
                        deltas.append(d)
                    deltas = [d if d is not None else torch.zeros(shape, device=cdev) for d in deltas]
                    tname = f"{name}.weight"
                    inputs = MergeInputs(name=tname, tensors=deltas, base=torch.zeros(shape, device=cdev),
                                         params=per_model, global_params=glob,
                                         models=[str(ad.path) for ad in ads], seed=seed,
                                         layer_index=_layer_index(name))
                    merged = impl(inputs).to(torch.float32)
                    f = am.low_rank_factor(merged, rank, exact=exact, oversample=oversample, niter=niter,
                                           seed=tensor_seed(seed, tname, 0))
                    ka, kb = fmt.lora_keys(name, slot.kind)
                    code_dt = _torch_dtype(out_code) if out_code else _common_dtype(ads, slot)
                    tensors[ka] = f.a.to(code_dt).cpu().contiguous()
                    tensors[kb] = f.b.to(code_dt).cpu().contiguous()
                    report[name] = {"kind": slot.kind, "adapters": len(slot.members), **f.report(),
                                    "merged_norm": float(torch.linalg.vector_norm(merged.double()))}
                    if f.rank != rank:
                        report[name]["note"] = f"rank capped at {f.rank} by the module's shape"
                    bar.advance(status=name)
                for tname in sorted(saved):
                    keys = saved[tname]
                    # full copies are merged like the LoRA deltas: task vectors S_i - W on a zero base, then W + merged
                    bw = ckpt.get(tname).to(device=cdev, dtype=torch.float32)
                    xs = [ads[i].get(keys[i]).to(device=cdev, dtype=torch.float32) - bw if i in keys
                          else torch.zeros_like(bw) for i in range(len(ads))]
                    inputs = MergeInputs(name=tname, tensors=xs, base=torch.zeros_like(bw), params=per_model,
                                         global_params=glob, models=[str(ad.path) for ad in ads], seed=seed,
                                         layer_index=_layer_index(tname))
                    merged = bw + impl(inputs).to(torch.float32)
                    dt = _torch_dtype(out_code) if out_code else ads[min(keys)].get(keys[min(keys)]).dtype
                    module, _, param = tname.rpartition(".")
                    # a full copy of a LoRA-targeted layer (save_embedding_layers) is saved as its base_layer
                    key = f"{fmt.KEY_PREFIX}{module}.base_layer.{param}" if module in slots else fmt.saved_key(tname)
                    tensors[key] = merged.to(dt).cpu().contiguous()
                    bar.advance(status=tname)
            modules_to_save = sorted({m for ad in ads for m in (ad.config.get("modules_to_save") or [])})
            bias_mode = "all" if any(ad.config.get("bias", "none") != "none" for ad in ads) else "none"
            task_types = {ad.config.get("task_type") for ad in ads}
            cfg = fmt.lora_config(r=rank, alpha=float(rank), target_modules=sorted(slots),
                                  base_model_name_or_path=str(base), fan_in_fan_out=fan_in_fan_out,
                                  modules_to_save=modules_to_save or None, bias=bias_mode,
                                  task_type=task_types.pop() if len(task_types) == 1 else None)
            fmt.write_adapter(pub.path, cfg, tensors)
            pub.copy_aux(ads[0].path)
            errs = [r["rel_error"] for r in report.values()]
            doc = {
                "mode": "into-adapter",
                "output": str(out),
                "method": comp.name,
                "method_params": {"per_model": per_model, "global": glob},
                "rank": rank,
                "svd": "exact" if exact else f"randomized (oversample {oversample}, {niter} power iterations, seed {seed})",
                "modules": len(slots),
                "saved_tensors": len(saved),
                "max_rel_error": max(errs) if errs else 0.0,
                "mean_rel_error": sum(errs) / len(errs) if errs else 0.0,
                "base": base_ident,
                "adapters": [{"path": str(ad.path), "weight": w, "kind": ad.kind, "ranks": ad.ranks,
                              "sha256": file_sha256([ad.weights_path])[ad.weights_path.name]}
                             for ad, w in zip(ads, weights)],
                "base_quantization": policy.describe() if policy.active else None,
                "per_module": report,
            }
            prov = dict(doc)
            prov.pop("output")
            prov["base_quantization"] = policy.describe() if policy.active else None
            pub.provenance.update(prov)
            pub.tags += ["peft", "lora"]
            pub.summary.append(
                f"A LoRA adapter (rank {rank}) merging {len(ads)} adapters of `{base}` with `{comp.name}` on their "
                "weight deltas, factored back by a truncated SVD (`adaptkit merge-adapter --into-adapter`).")
            pub.sections["Base"] = _base_section(base_ident)
            pub.sections["Adapters"] = _adapters_table(doc["adapters"])
            pub.sections["Reconstruction"] = (
                f"Relative Frobenius error of the rank-{rank} factorisation per module: max {doc['max_rel_error']:.3g}, "
                f"mean {doc['mean_rel_error']:.3g} ({len(slots)} modules; per module in adaptkit.json).")
            pub.card_text = _peft_card(pub, str(base))
        doc["seconds"] = round(time.perf_counter() - t0, 3)
        return doc
    finally:
        if ckpt is not None:
            ckpt.close()
        for ad in ads:
            ad.close()


def _torch_dtype(code: str) -> Any:
    from adaptkit.io.dtypes import torch_dtype

    return torch_dtype(code)


def _common_dtype(ads: list[Any], slot: _Slot) -> Any:
    """The output dtype of a merged module: the widest dtype of the inputs' LoRA matrices."""
    import torch

    order = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
    dts = [ads[i].get(m.a_key).dtype for i, m in slot.members]
    return max(dts, key=lambda d: order.index(d) if d in order else 2)


def _check_same_base(ads: list[Any]) -> None:
    shas = {tuple(sorted(ad.base_sha256.items())) for ad in ads if ad.base_sha256}
    if len(shas) > 1:
        raise CheckpointError("the adapters record different bases in adaptkit.json (base weight sha256 differ); "
                              "adapters of different bases cannot be merged (pass --assume-same-base to override)")
    names = {ad.base_name for ad in ads if ad.base_name}
    if len(names) > 1:
        raise CheckpointError(f"the adapters name different bases in adapter_config.json ({', '.join(sorted(names))}); "
                              "pass --assume-same-base if they are the same model under different names")


def _peft_card(pub: Any, base: str) -> str:
    """The generated card with PEFT's front matter (``library_name: peft``, ``base_model``)."""
    text = pub.card()
    return text.replace("library_name: transformers", f"library_name: peft\nbase_model: {base}", 1)
