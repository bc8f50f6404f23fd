"""``extract-lora``: a PEFT LoRA adapter that turns BASE into (approximately) FINETUNED.

Per tensor, streaming: ``dW = W_ft - W_base`` in fp32; a 2-D linear weight gets a LoRA, an embedding an
embedding LoRA (factored from ``dW^T``, PEFT's layout), both from a truncated SVD at ``rank``:
``dW ~= U_r S_r V_r^T``, ``B = U_r S_r^(1/2)``, ``A = S_r^(1/2) V_r^T``, ``lora_alpha = r`` (scaling 1).
The SVD is randomized by default (``torch.svd_lowrank``: ``rank + oversample`` probes, ``niter`` power
iterations, probes seeded per tensor) or exact (``--exact``, ``torch.linalg.svd``). ``energy`` (the kept share of
``||dW||_F^2``) and the measured relative error are reported per module; ``min_energy`` picks a smaller rank per
module where it suffices (``rank_pattern``). Other changed tensors (norms, biases of untargeted modules) are
saved in full through ``modules_to_save`` (``other="save"``) or reported as not captured (``"skip"``).
Unchanged tensors are skipped. Semantics: specs/adapters.md, "Extraction".
"""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from adaptkit.errors import CheckpointError, ConfigError

_FLOAT = ("F64", "F32", "F16", "BF16")


def _classify(name: str, shape: tuple[int, ...]) -> str:
    from adaptkit.adapters.qlora import EMBEDDING_NAMES

    if len(shape) == 2 and name.endswith(".weight"):
        last = name[: -len(".weight")].rsplit(".", 1)[-1]
        return "embedding" if last in EMBEDDING_NAMES else "linear"
    return "other"


def extract_lora(host: Any, finetuned: str | Path, base: str | Path, out: str | Path, *, rank: int,
                 exact: bool = False, oversample: int = 10, niter: int = 2, seed: int = 0, device: str = "cpu",
                 dtype: str = "float32", other: str = "save", min_energy: float | None = None,
                 force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Extract a LoRA of ``rank`` from ``finetuned`` relative to ``base`` into the PEFT folder ``out``."""
    import torch

    from adaptkit.adapters import math as am
    from adaptkit.adapters.view import dtype_code_of
    from adaptkit.formats import peft as fmt
    from adaptkit.io import check_output_target
    from adaptkit.io.dtypes import torch_dtype
    from adaptkit.io.publish import file_sha256, publish_output
    from adaptkit.merge.api import tensor_seed
    from adaptkit.progress import Progress

    if rank < 1:
        raise ConfigError(f"--rank must be a positive integer, got {rank}")
    if other not in ("save", "skip"):
        raise ConfigError(f"--other must be save or skip, got {other!r}")
    if min_energy is not None and not 0.0 < min_energy <= 1.0:
        raise ConfigError(f"--min-energy must be in (0, 1], got {min_energy}")
    out_dt = torch_dtype(dtype_code_of(dtype) or "F32")
    check_output_target(out, force)
    t0 = time.perf_counter()
    ft = host.open_model(finetuned)
    try:
        bs = host.open_model(base)
    except BaseException:
        ft.close()
        raise
    try:
        fnames, bnames = ft.names(), set(bs.names())
        extra = [n for n in fnames if n not in bnames]
        missing = [n for n in bs.names() if n not in set(fnames)]
        if extra or missing:
            what = (f"{len(extra)} tensor(s) BASE lacks (e.g. {extra[0]!r})" if extra else
                    f"no {missing[0]!r} (and {len(missing) - 1} more) that BASE has")
            raise CheckpointError(f"{finetuned}: has {what}; it is not a fine-tune of {base}")
        for n in fnames:
            a, b = tuple(ft.info(n).shape), tuple(bs.info(n).shape)
            if a != b:
                raise CheckpointError(f"{finetuned}: {n} is {list(a)} but {base} has {list(b)}; a LoRA cannot change "
                                      "shapes (resized vocabulary or another model)")
        base_ident = {"path": str(base), "loader": getattr(bs, "loader", None),
                      "source_format": getattr(bs, "source_format", None), "sha256": file_sha256(list(bs.files))}
        ft_ident = {"path": str(finetuned), "loader": getattr(ft, "loader", None),
                    "source_format": getattr(ft, "source_format", None), "sha256": file_sha256(list(ft.files))}
        cfg = ft.config or {}
        tied = bool(cfg.get("tie_word_embeddings", False)) and "lm_head.weight" not in bnames
        tensors: dict[str, Any] = {}
        report: dict[str, dict[str, Any]] = {}
        targets: dict[str, str] = {}
        rank_pattern: dict[str, int] = {}
        changed_other: list[str] = []
        notes: list[str] = []
        svd_seconds = 0.0
        with publish_output(out, kind="extract-lora", force=force,
                            title=f"LoRA (rank {rank}) extracted from {Path(finetuned).name}") as pub:
            with Progress(len(fnames), "extracting LoRA", unit="tensors", enabled=progress) as bar:
                for n in fnames:
                    info = ft.info(n)
                    shape = tuple(info.shape)
                    if info.dtype not in _FLOAT:
                        bar.advance()
                        continue
                    wf, wb = _read(ft, n), _read(bs, n)
                    if torch.equal(wf, wb):
                        bar.advance()
                        continue
                    kind = _classify(n, shape)
                    if kind == "other":
                        changed_other.append(n)
                        bar.advance()
                        continue
                    module = n[: -len(".weight")]
                    delta = wf.to(device=device, dtype=torch.float32) - wb.to(device=device, dtype=torch.float32)
                    del wf, wb
                    m = delta.T if kind == "embedding" else delta
                    ts = time.perf_counter()
                    f = am.low_rank_factor(m, rank, exact=exact, oversample=oversample, niter=niter,
                                           seed=tensor_seed(seed, n, 0))
                    total_sq = float(torch.linalg.vector_norm(m.double()) ** 2)
                    if min_energy is not None:
                        f = f.truncate(max(1, f.rank_for_energy(min_energy, m)), m)
                    r_eff = f.rank
                    svd_seconds += time.perf_counter() - ts
                    ka, kb = fmt.lora_keys(module, kind)
                    tensors[ka] = f.a.to(out_dt).cpu().contiguous()
                    tensors[kb] = f.b.to(out_dt).cpu().contiguous()
                    targets[module] = kind
                    if r_eff != rank:
                        rank_pattern[module] = r_eff
                    report[module] = {"kind": kind, "shape": list(shape), **f.report(),
                                      "delta_norm": total_sq ** 0.5}
                    bar.advance(status=f"{module} r={r_eff} energy {f.energy:.4f}")
            saved_modules: list[str] = []
            not_captured: list[str] = []
            by_module: dict[str, list[str]] = {}
            for n in changed_other:
                by_module.setdefault(n.rsplit(".", 1)[0] if "." in n else "", []).append(n)
            for module, names in sorted(by_module.items()):
                if other == "skip" or module in targets or not module:
                    not_captured += names
                    continue
                saved_modules.append(module)
                prefix = module + "."
                for n in fnames:  # the whole module is saved (PEFT's ModulesToSaveWrapper copies all of it)
                    if n.startswith(prefix) and "." not in n[len(prefix):]:
                        t = _read(ft, n)
                        tensors[fmt.saved_key(n)] = (t.to(out_dt) if t.is_floating_point() else t).contiguous()
            if not_captured:
                notes.append(f"{len(not_captured)} changed tensor(s) not captured by the adapter "
                             f"(e.g. {not_captured[0]}): " + ("--other skip" if other == "skip" else
                                                              "biases of LoRA-targeted layers"))
            if tied and any(v == "embedding" for v in targets.values()):
                notes.append("the model ties lm_head to the embeddings: the embedding LoRA changes the input "
                             "embeddings only (PEFT does not apply it to the tied output head)")
            if not targets and not saved_modules:
                raise CheckpointError(f"{finetuned}: no tensor differs from {base}; there is nothing to extract")
            alpha_pattern = {re.escape(k): float(v) for k, v in rank_pattern.items()}
            config = fmt.lora_config(
                r=rank, alpha=float(rank), target_modules=sorted(targets),
                base_model_name_or_path=str(base), modules_to_save=saved_modules or None,
                rank_pattern={re.escape(k): v for k, v in rank_pattern.items()}, alpha_pattern=alpha_pattern)
            fmt.write_adapter(pub.path, config, tensors)
            pub.copy_aux(ft)
            energies = [r["energy"] for r in report.values()]
            errs = [r["rel_error"] for r in report.values()]
            doc = {
                "output": str(out),
                "rank": rank,
                "min_energy": min_energy,
                "svd": "exact" if exact else "randomized",
                "oversample": None if exact else oversample,
                "niter": None if exact else niter,
                "seed": seed,
                "modules": len(targets),
                "embedding_modules": sum(1 for v in targets.values() if v == "embedding"),
                "modules_to_save": saved_modules,
                "not_captured": not_captured,
                "min_module_energy": min(energies) if energies else 1.0,
                "mean_module_energy": sum(energies) / len(energies) if energies else 1.0,
                "max_rel_error": max(errs) if errs else 0.0,
                "adapter_parameters": sum(int(t.numel()) for t in tensors.values()),
                "svd_seconds": round(svd_seconds, 3),
                "finetuned": ft_ident,
                "base": base_ident,
                "notes": notes,
                "per_module": report,
            }
            prov = dict(doc)
            prov.pop("output")
            pub.provenance.update(prov)
            pub.tags += ["peft", "lora", "extracted"]
            pub.summary.append(
                f"A rank-{rank} LoRA extracted from `{finetuned}` relative to `{base}` by `adaptkit extract-lora` "
                f"({'exact' if exact else 'randomized'} truncated SVD of each weight delta).")
            pub.sections["Quality"] = (
                f"{len(targets)} modules; share of each delta's energy kept: min {doc['min_module_energy']:.4f}, "
                f"mean {doc['mean_module_energy']:.4f}; largest relative error {doc['max_rel_error']:.3g}.")
            if notes:
                pub.sections["Notes"] = "\n".join(f"* {x}" for x in notes)
            pub.card_text = pub.card().replace("library_name: transformers",
                                               f"library_name: peft\nbase_model: {base}", 1)
        doc["seconds"] = round(time.perf_counter() - t0, 3)
        return doc
    finally:
        ft.close()
        bs.close()


def _read(ckpt: Any, name: str) -> Any:
    try:
        return ckpt.get(name, copy=True)
    except TypeError:
        return ckpt.get(name)
