"""Release gates: the ``gates.yml`` schema, its validation (one-line ``ConfigError`` naming the file, the key
and the rule) and the pass/fail evaluation of measured metrics.

Schema (version 1; every section optional, unknown keys refused)::

    version: 1
    limit: 200                    # samples per task for every evaluation below (default: whole task)
    bits_per_byte:                # evaluator `perplexity`; byte-level: works across tokenizers
      tasks: [flores_eng]         # default [flores_eng]
      max_increase: 0.02          # model - baseline <= this, per task (required)
    agreement:                    # evaluator `agreement`; token-level: the baseline must share the tokenizer
      tasks: [flores_eng]
      min_top1: 0.90              # top-1 agreement >= this
      max_kl: 0.05                # mean KL(baseline || model) in nats/token <= this (one of the two required)
    multiple_choice:              # evaluator `lmeval`
      tasks: [analogy_mc]         # default [analogy_mc]
      metric: acc                 # acc | acc_norm
      min_accuracy_change: -0.02  # model - baseline >= this, per task (required)
    probes:                       # evaluator `probes`
      file: probes.jsonl          # relative to the gates file; default: the shipped `basic` probes
      must_pass: [capital_france] # probe ids (or "all") that must pass on the model
      no_new_failures: true       # every probe the baseline passes must pass on the model

Gates that compare (``bits_per_byte``, ``agreement``, ``multiple_choice``, ``probes.no_new_failures``) need
``--baseline``. Nothing here imports torch.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adaptkit.errors import ConfigError

SECTIONS: dict[str, dict[str, Any]] = {
    "bits_per_byte": {"tasks": list, "max_increase": float},
    "agreement": {"tasks": list, "min_top1": float, "max_kl": float},
    "multiple_choice": {"tasks": list, "metric": str, "min_accuracy_change": float},
    "probes": {"file": str, "must_pass": (list, str), "no_new_failures": bool},
}
TOP_LEVEL = {"version": int, "limit": int, **{k: dict for k in SECTIONS}}
DEFAULT_TASKS = {"bits_per_byte": ["flores_eng"], "agreement": ["flores_eng"], "multiple_choice": ["analogy_mc"]}
EVALUATOR_OF = {"bits_per_byte": "perplexity", "agreement": "agreement", "multiple_choice": "lmeval",
                "probes": "probes"}
DEFAULT_GATES = Path(__file__).with_name("default_gates.yml")


@dataclass
class Gates:
    """A validated gates file."""

    path: Path
    limit: int | None = None
    bits_per_byte: dict[str, Any] | None = None
    agreement: dict[str, Any] | None = None
    multiple_choice: dict[str, Any] | None = None
    probes: dict[str, Any] | None = None

    def sections(self) -> dict[str, dict[str, Any]]:
        return {k: getattr(self, k) for k in SECTIONS if getattr(self, k) is not None}

    @property
    def needs_baseline(self) -> list[str]:
        out = [k for k in ("bits_per_byte", "agreement", "multiple_choice") if getattr(self, k) is not None]
        if self.probes is not None and self.probes.get("no_new_failures"):
            out.append("probes.no_new_failures")
        return out

    @property
    def token_level(self) -> list[str]:
        """Sections that compare token distributions (need the same tokenizer)."""
        return ["agreement"] if self.agreement is not None else []


def _fail(path: Path, key: str, rule: str) -> ConfigError:
    return ConfigError(f"{path}: {key}: {rule}")


def _unknown(path: Path, where: str, key: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    prefix = f"{where}." if where else ""
    return ConfigError(f"{path}: unknown key {prefix}{key!r}{hint} (known: {', '.join(known)})")


def _number(path: Path, key: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
        raise _fail(path, key, f"must be a finite number, got {v!r}")
    return float(v)


def load_gates(path: str | Path) -> Gates:
    """Read and validate a gates file."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: gates file does not exist")
    try:
        doc = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{p}: not valid YAML{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot read the gates file ({e})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{p}: a gates file is a mapping (version: 1 and gate sections), got "
                          f"{type(doc).__name__}")
    for key in doc:
        if key not in TOP_LEVEL:
            raise _unknown(p, "", str(key), list(TOP_LEVEL))
    if doc.get("version") != 1:
        raise _fail(p, "version", f"must be 1 (the schema version), got {doc.get('version')!r}")
    gates = Gates(path=p)
    if "limit" in doc:
        lim = doc["limit"]
        if isinstance(lim, bool) or not isinstance(lim, int) or lim < 1:
            raise _fail(p, "limit", f"must be a positive integer, got {lim!r}")
        gates.limit = lim
    for section, fields in SECTIONS.items():
        if section not in doc:
            continue
        body = doc[section]
        if not isinstance(body, dict):
            raise _fail(p, section, f"must be a mapping of {', '.join(fields)}, got {body!r}")
        for key in body:
            if key not in fields:
                raise _unknown(p, section, str(key), list(fields))
        out: dict[str, Any] = {}
        for key, value in body.items():
            where = f"{section}.{key}"
            kind = fields[key]
            if kind is float:
                out[key] = _number(p, where, value)
            elif kind is list:
                if not (isinstance(value, list) and value and all(isinstance(t, str) and t for t in value)):
                    raise _fail(p, where, f"must be a non-empty list of task names, got {value!r}")
                out[key] = list(value)
            elif kind is str:
                if not isinstance(value, str) or not value:
                    raise _fail(p, where, f"must be a non-empty string, got {value!r}")
                out[key] = value
            elif kind is bool:
                if not isinstance(value, bool):
                    raise _fail(p, where, f"must be true or false, got {value!r}")
                out[key] = value
            else:  # must_pass: list of ids or "all"
                if value == "all":
                    out[key] = "all"
                elif isinstance(value, list) and value and all(isinstance(t, str) and t for t in value):
                    out[key] = list(value)
                else:
                    raise _fail(p, where, f"must be a list of probe ids or \"all\", got {value!r}")
        if section in DEFAULT_TASKS:
            out.setdefault("tasks", list(DEFAULT_TASKS[section]))
        if section == "bits_per_byte" and "max_increase" not in out:
            raise _fail(p, section, "needs max_increase (the largest allowed bits-per-byte increase)")
        if section == "agreement":
            if "min_top1" not in out and "max_kl" not in out:
                raise _fail(p, section, "needs min_top1 and/or max_kl")
            if "min_top1" in out and not 0.0 <= out["min_top1"] <= 1.0:
                raise _fail(p, "agreement.min_top1", f"must be in [0, 1], got {out['min_top1']}")
            if "max_kl" in out and out["max_kl"] < 0:
                raise _fail(p, "agreement.max_kl", f"must be >= 0, got {out['max_kl']}")
        if section == "multiple_choice":
            out.setdefault("metric", "acc")
            if out["metric"] not in ("acc", "acc_norm"):
                raise _fail(p, "multiple_choice.metric", f"must be acc or acc_norm, got {out['metric']!r}")
            if "min_accuracy_change" not in out:
                raise _fail(p, section, "needs min_accuracy_change (e.g. -0.02: at most 2 points worse)")
        if section == "probes":
            if "file" in out:
                fp = Path(out["file"]).expanduser()
                out["file"] = str(fp if fp.is_absolute() else (p.parent / fp))
            if "must_pass" not in out and not out.get("no_new_failures"):
                raise _fail(p, section, "needs must_pass and/or no_new_failures: true")
        setattr(gates, section, out)
    if not gates.sections():
        raise ConfigError(f"{p}: no gates (add one of {', '.join(SECTIONS)})")
    return gates


@dataclass
class GateResult:
    gate: str  #: e.g. "bits_per_byte.max_increase"
    task: str
    metric: str
    value: float | None
    baseline: float | None
    threshold: float | None
    op: str  #: how value/delta is compared: "delta <=", ">=", "<=", "delta >=", "pass"
    passed: bool
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def delta(self) -> float | None:
        if self.value is None or self.baseline is None:
            return None
        return self.value - self.baseline

    def to_json(self) -> dict[str, Any]:
        return {"gate": self.gate, "task": self.task, "metric": self.metric, "value": self.value,
                "baseline": self.baseline, "delta": self.delta, "threshold": self.threshold, "op": self.op,
                "passed": self.passed, "detail": self.detail}

    def line(self) -> str:
        mark = "PASS" if self.passed else "FAIL"
        return f"{mark} {self.gate} [{self.task}] {self.detail}"


def _metric(results: dict[str, Any], evaluator: str, name: str, task: str) -> Any:
    res = results.get(evaluator)
    if res is None:
        return None
    try:
        return res.metric(name, task)
    except KeyError:
        return None


def evaluate_gates(gates: Gates, results: dict[str, Any], probe_rows: dict[str, list[dict[str, Any]]],
                   base_probe_rows: dict[str, list[dict[str, Any]]] | None) -> list[GateResult]:
    """Compare measured metrics (``results``: evaluator -> EvalResult, with baselines filled) to the gates."""
    out: list[GateResult] = []

    def missing(gate: str, task: str, metric: str) -> GateResult:
        return GateResult(gate, task, metric, None, None, None, "", False, "metric was not measured")

    if gates.bits_per_byte:
        thr = gates.bits_per_byte["max_increase"]
        for task in gates.bits_per_byte["tasks"]:
            m = _metric(results, "perplexity", "bits_per_byte", task)
            if m is None or m.baseline is None:
                out.append(missing("bits_per_byte.max_increase", task, "bits_per_byte"))
                continue
            ok = m.delta <= thr
            out.append(GateResult("bits_per_byte.max_increase", task, "bits_per_byte", m.value, m.baseline, thr,
                                  "delta <=", ok, f"bits/byte {m.value:.4f} vs baseline {m.baseline:.4f}: "
                                  f"{m.delta:+.4f} (allowed <= {thr:+.4f})"))
    if gates.agreement:
        for task in gates.agreement["tasks"]:
            for key, metric, op in (("min_top1", "top1_agreement", ">="), ("max_kl", "kl_divergence", "<=")):
                if key not in gates.agreement:
                    continue
                thr = gates.agreement[key]
                m = _metric(results, "agreement", metric, task)
                if m is None:
                    out.append(missing(f"agreement.{key}", task, metric))
                    continue
                ok = m.value >= thr if op == ">=" else m.value <= thr
                out.append(GateResult(f"agreement.{key}", task, metric, m.value, m.baseline, thr, op, ok,
                                      f"{metric} {m.value:.4f} (required {op} {thr:g})"))
    if gates.multiple_choice:
        thr = gates.multiple_choice["min_accuracy_change"]
        metric = gates.multiple_choice["metric"]
        for task in gates.multiple_choice["tasks"]:
            m = _metric(results, "lmeval", metric, task)
            if m is None or m.baseline is None:
                out.append(missing("multiple_choice.min_accuracy_change", task, metric))
                continue
            ok = m.delta >= thr
            out.append(GateResult("multiple_choice.min_accuracy_change", task, metric, m.value, m.baseline, thr,
                                  "delta >=", ok, f"{metric} {m.value:.4f} vs baseline {m.baseline:.4f}: "
                                  f"{m.delta:+.4f} (required >= {thr:+.4f})"))
    if gates.probes:
        for task, rows in probe_rows.items():
            by_id = {r["id"]: r for r in rows}
            must = gates.probes.get("must_pass")
            if must is not None:
                ids = list(by_id) if must == "all" else must
                for pid in ids:
                    r = by_id.get(pid)
                    ok = bool(r and r["passed"])
                    detail = (f"probe {pid!r} is not in {task}" if r is None else
                              f"probe {pid!r}: {r['reason']}; output {r['output'][:80]!r}")
                    out.append(GateResult("probes.must_pass", task, pid, float(ok) if r else None, None, None,
                                          "pass", ok, detail))
            if gates.probes.get("no_new_failures") and base_probe_rows is not None:
                base = {r["id"]: r for r in base_probe_rows.get(task, [])}
                newly = [pid for pid, r in by_id.items() if not r["passed"] and base.get(pid, {}).get("passed")]
                passed_base = sum(1 for r in base.values() if r["passed"])
                out.append(GateResult("probes.no_new_failures", task, "pass_rate",
                                      sum(r["passed"] for r in rows) / max(len(rows), 1),
                                      passed_base / max(len(base), 1) if base else None, None, "pass", not newly,
                                      (f"{len(newly)} probe(s) the baseline passes now fail: {', '.join(newly[:5])}"
                                       if newly else f"every probe the baseline passes ({passed_base}) still passes")))
    return out


def check_probe_ids(gates: Gates, probe_files: dict[str, Path]) -> None:
    """``must_pass`` names probes that exist (ConfigError naming the gates file otherwise)."""
    if not gates.probes or gates.probes.get("must_pass") in (None, "all"):
        return
    import json

    ids: set[str] = set()
    for path in probe_files.values():
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            if line.strip() and not line.lstrip().startswith("//"):
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue  # the evaluator reports malformed lines precisely
                if isinstance(obj, dict) and isinstance(obj.get("id"), str):
                    ids.add(obj["id"])
    for pid in gates.probes["must_pass"]:
        if pid not in ids:
            close = difflib.get_close_matches(pid, sorted(ids), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{gates.path}: probes.must_pass: no probe {pid!r} in "
                              f"{', '.join(str(p) for p in probe_files.values())}{hint}")
