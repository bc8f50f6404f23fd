"""``adaptkit verify``: static checks, a strict load, behavioural gates against a baseline; one report.

Order (each stage runs only when the previous one found no error):

1. bad input first (one-line errors before any work): the model and baseline exist, the gates file is valid
   and names known tasks and probes, gates that compare have a baseline, token-level gates have a baseline
   with the same tokenizer;
2. static checks (:mod:`adaptkit.verify.static`) -- no model code runs;
3. load check (:mod:`adaptkit.verify.load`): transformers must load every tensor (no missing, unexpected or
   mis-shaped key) and produce finite logits; quantized checkpoints load through transformers'
   quantization backend when it is installed and usable, else through adaptkit's dequantizing loader;
4. gates (:mod:`adaptkit.verify.gates`) measured by the registered evaluators through the evaluate runner.

Verdict and exit code: ``pass`` (0), ``gate-failed`` (7, :class:`~adaptkit.errors.QualityGateError`),
``broken`` (4, :class:`~adaptkit.errors.CheckpointError`). ``--manifest write`` writes
``adaptkit-manifest.json`` once the checkpoint is not broken.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from adaptkit.errors import CheckpointError, ConfigError, ExitCode
from adaptkit.verify import evaluation
from adaptkit.verify.findings import Findings
from adaptkit.verify.gates import DEFAULT_GATES, EVALUATOR_OF, Gates, check_probe_ids, evaluate_gates, load_gates

VERDICT_CODES = {"pass": int(ExitCode.OK), "gate-failed": int(ExitCode.QUALITY), "broken": int(ExitCode.INPUT)}


def _resolve_gate_tasks(host: Any, gates: Gates) -> dict[str, Path]:
    """Check every task a gate names; return the probe files {task name: path} the probes gate uses."""
    cat = evaluation.catalog(host)
    for section, body in gates.sections().items():
        ev = EVALUATOR_OF[section]
        if ev not in cat:
            raise ConfigError(f"{gates.path}: {section} needs the evaluator {ev!r}, which is not installed "
                              f"({evaluation.INSTALL_HINT})")
        for task in body.get("tasks", []):
            try:
                evaluation._task_of(cat, ev, task)
            except ConfigError as e:
                raise ConfigError(f"{gates.path}: {section}.tasks: {e.message}") from None
    probe_files: dict[str, Path] = {}
    if gates.probes is not None:
        if gates.probes.get("file"):
            p = Path(gates.probes["file"])
            if not p.is_file():
                raise ConfigError(f"{gates.path}: probes.file: {p} does not exist")
            probe_files[p.stem] = p
        else:
            shipped = [s for s in cat.get("probes", ()) if "quick" in s.options.get("suites", ())] or list(
                cat.get("probes", ()))[:1]
            if not shipped:
                raise ConfigError(f"{gates.path}: probes: no probe file given and the probes evaluator ships none")
            probe_files[shipped[0].name] = Path(shipped[0].path)
        check_probe_ids(gates, probe_files)
    return probe_files


def _load_check(model: Path, host: Any, findings: Findings, device: str) -> dict[str, Any] | None:
    rec = findings.start("load", "transformers loads every tensor (no missing/unexpected keys) and the logits "
                                 "are finite")
    from adaptkit.verify.load import load_causal_lm

    try:
        lm = load_causal_lm(model, host=host, deployment=True, strict=False, device=device, dtype="float32")
    except CheckpointError as e:
        findings.add("cannot-load", model, e.message)
        return None
    info = lm.describe()
    for kind, names, rule, why in (("missing", lm.missing, "missing-key", "transformers initialised it randomly"),
                                   ("unexpected", lm.unexpected, "unexpected-key", "transformers ignored it"),
                                   ("mis-shaped", lm.mismatched, "mismatched-key", "its shape is not the architecture's")):
        for name in names[:10]:
            findings.add(rule, model, f"{model}: {kind} tensor {name!r} when loading ({why})")
    import torch

    try:
        ids = lm.tokenizer("The capital of France is Paris.", add_special_tokens=False)["input_ids"] or [0]
        x = torch.tensor([ids], dtype=torch.long, device=lm.model.device)
        with torch.inference_mode():
            logits = lm.model(input_ids=x).logits
        if not bool(torch.isfinite(logits.float()).all()):
            findings.add("non-finite-logits", model, f"{model}: the logits of a short sentence contain NaN or Inf")
        info["forward"] = {"tokens": len(ids), "finite": bool(torch.isfinite(logits.float()).all())}
    except Exception as e:  # noqa: BLE001 - any failure of the forward pass is the checkpoint's
        findings.add("forward-failed", model, f"{model}: a forward pass failed ({type(e).__name__}: "
                     f"{' '.join(str(e).split())[:200]})")
    rec.detail = f"{info['route']}: {info['note']}"
    del lm
    return info


def verify(model: str | Path, *, host: Any, baseline: str | Path | None = None, gates_file: str | Path | None = None,
           manifest: str | None = None, out: Path | None = None, device: str = "cpu", batch_size: int = 64,
           limit: int | None = None, scan_values: bool = True, progress: bool = True) -> dict[str, Any]:
    """Run ``adaptkit verify`` and write its report; returns the report document (see specs/verify.md)."""
    from adaptkit import __version__

    t0 = time.perf_counter()
    model = Path(model)
    base = Path(baseline) if baseline is not None else None
    if not model.exists():
        raise CheckpointError(f"{model}: no such file or folder (the model to verify)")
    if base is not None and not base.exists():
        raise CheckpointError(f"{base}: no such file or folder (the baseline)")
    if manifest not in (None, "write", "check"):
        raise ConfigError(f"--manifest {manifest!r}: expected write or check")
    notes: list[str] = []
    gates: Gates | None = None
    default_gates = False
    if gates_file is not None:
        gates = load_gates(gates_file)
    elif base is not None:
        gates, default_gates = load_gates(DEFAULT_GATES), True
        notes.append(f"gates: the defaults ({DEFAULT_GATES.name}); pass --gates FILE for your own")
    if gates is not None and base is None and gates.needs_baseline:
        raise ConfigError(f"{gates.path}: {', '.join(gates.needs_baseline)} compare against a baseline: give one "
                          "(--baseline)")
    probe_files = _resolve_gate_tasks(host, gates) if gates is not None else {}
    tokenizer: dict[str, Any] | None = None
    if base is not None and gates is not None:
        try:
            same, why = evaluation.check_tokenizers(host, model, base)
        except CheckpointError:
            same, why = None, "a tokenizer does not load (see the checks)"
        tokenizer = {"same": same, "detail": why}
        if same is False and gates.token_level:
            if default_gates:
                gates.agreement = None
                notes.append(f"agreement gate skipped: the baseline has a different tokenizer ({why}); "
                             "bits-per-byte still compares")
            else:
                raise ConfigError(f"{gates.path}: agreement compares token distributions and the baseline {base} "
                                  f"has a different tokenizer than {model} ({why}); token-level gates need the same "
                                  "tokenizer, byte-level ones (bits_per_byte, multiple_choice) do not")

    bar = evaluation.progress_bar("verify", enabled=progress)
    relay = evaluation.ProgressRelay(bar)
    findings = Findings()
    load_info = None
    results: dict[str, Any] = {}
    gate_results: list[Any] = []
    with bar:
        relay.stage("static checks")
        from adaptkit.verify.static import StaticChecker

        StaticChecker(model, host=host, findings=findings,
                      progress=lambda d, t, s: relay(d, t)).run(manifest=manifest, scan_values=scan_values)
        if not findings.errors:
            relay.stage("load check")
            load_info = _load_check(model, host, findings, device)
        else:
            findings.skip("load", "static checks failed")
        if not findings.errors and gates is not None:
            planned: list[evaluation.PlannedEval] = []
            cat = evaluation.catalog(host)
            for section, body in gates.sections().items():
                ev = EVALUATOR_OF[section]
                if section == "probes":
                    continue
                tasks = tuple(evaluation._task_of(cat, ev, t) for t in body["tasks"])
                existing = next((p for p in planned if p.evaluator == ev), None)
                if existing is None:
                    planned.append(evaluation.PlannedEval(ev, tasks))
                else:
                    existing.tasks = existing.tasks + tuple(t for t in tasks if t not in existing.tasks)
            run_limit = limit if limit is not None else gates.limit
            common = dict(limit=run_limit, device=device, batch_size=batch_size, seed=0, output=None, relay=relay,
                          same_tokenizer=(tokenizer["same"], tokenizer["detail"]) if tokenizer and tokenizer["same"]
                          is not None else None)
            results = evaluation.run_planned(host, planned, model=model, baseline=base, **common)
            probe_rows: dict[str, list[dict[str, Any]]] = {}
            base_rows: dict[str, list[dict[str, Any]]] | None = None
            if gates.probes is not None:
                specs = tuple(evaluation.TaskSpec(name, path) for name, path in probe_files.items())
                res = evaluation.run_planned(host, [evaluation.PlannedEval("probes", specs)], model=model,
                                             baseline=None, **common)["probes"]
                probe_rows = res.details.get("probes", {})
                if gates.probes.get("no_new_failures") and base is not None:
                    bres = evaluation.run_planned(host, [evaluation.PlannedEval("probes", specs)], model=base,
                                                  baseline=None, **common)["probes"]
                    base_rows = bres.details.get("probes", {})
                    for m in res.metrics:
                        try:
                            m.baseline = bres.metric(m.name, m.task).value
                        except KeyError:
                            pass
                results["probes"] = res
            gate_results = evaluate_gates(gates, results, probe_rows, base_rows)
        elif gates is not None:
            notes.append("gates not evaluated: the checkpoint is broken")
    if findings.errors:
        verdict = "broken"
    elif any(not g.passed for g in gate_results):
        verdict = "gate-failed"
    else:
        verdict = "pass"
    manifest_doc: dict[str, Any] | None = None
    if manifest == "write":
        if verdict == "broken":
            manifest_doc = {"mode": "write", "written": None, "detail": "not written: the checkpoint is broken"}
        else:
            from adaptkit.io.manifest import write_manifest

            folder = model if model.is_dir() else model.parent
            manifest_doc = {"mode": "write", "written": str(write_manifest(folder))}
    elif manifest == "check":
        manifest_doc = {"mode": "check"}
    rows = evaluation.metric_rows(results)
    doc: dict[str, Any] = {
        "schema": 1, "command": "verify", "adaptkit_version": __version__, "model": str(model),
        "baseline": str(base) if base else None, "verdict": verdict, "exit_code": VERDICT_CODES[verdict],
        "checks": [r.to_json() for r in findings.records],
        "errors": [f.line() for f in findings.errors], "warnings": [f.line() for f in findings.warnings],
        "load": load_info, "tokenizer": tokenizer,
        "gates_file": None if gates is None else (None if default_gates else str(gates.path)),
        "gates_default": default_gates, "gates": [g.to_json() for g in gate_results], "metrics": rows,
        "results": {k: v.to_json() for k, v in results.items()}, "manifest": manifest_doc, "notes": notes,
    }
    from adaptkit.verify import report

    out_dir = Path(out) if out is not None else report.default_out(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    chart_path, chart_note = report.chart(rows, out_dir / "verify.png", title=f"{model.name} vs {base.name}" if base
                                          else model.name, gates=doc["gates"])
    if chart_note and base is not None:
        notes.append(chart_note)
    doc["chart"] = chart_path
    doc["seconds"] = round(time.perf_counter() - t0, 3)
    doc["files"] = {"json": str(out_dir / "verify.json"), "card": str(out_dir / "verify.md"), "chart": chart_path}
    report.write_text(out_dir / "verify.md", report.verify_card(doc))
    report.write_json(out_dir / "verify.json", doc)
    return doc


def summary_lines(doc: dict[str, Any]) -> list[str]:
    """The human-readable output of ``adaptkit verify``."""
    from adaptkit.verify.report import text_table

    lines = [f"verify {doc['model']}" + (f" against {doc['baseline']}" if doc.get("baseline") else "")]
    for c in doc["checks"]:
        lines.append(f"  {c['status']:<8} {c['name']}" + (f"  ({c['detail']})" if c["detail"] else ""))
        for f in c["findings"]:
            lines.append(f"           {f['severity']}: {f['line']}")
    if doc.get("gates"):
        lines.append("gates:")
        for g in doc["gates"]:
            lines.append(f"  {'PASS' if g['passed'] else 'FAIL'} {g['gate']} [{g['task']}] {g['detail']}")
    if doc.get("metrics"):
        lines += ["", text_table(doc["metrics"]), ""]
    for n in doc.get("notes", []):
        lines.append(f"note: {n}")
    lines.append(f"verdict: {doc['verdict'].upper()} (exit {doc['exit_code']}); report: {doc['files']['json']}"
                 + (f", chart: {doc['chart']}" if doc.get("chart") else "") + f", card: {doc['files']['card']}")
    return lines
