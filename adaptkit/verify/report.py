"""Reports of ``adaptkit eval`` and ``adaptkit verify``: the terminal table, the JSON document, the model-card
section (Markdown) and the PNG chart, written into one folder (``--out``; default
``./adaptkit-reports/<model name>/``)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def default_out(model: Path) -> Path:
    name = model.name if not model.is_file() else (model.parent.name or model.stem)
    return Path("adaptkit-reports") / (name or "model")


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.{digits}g}"
        return f"{v:.{digits}f}"
    return str(v)


def _delta(row: dict[str, Any]) -> str:
    d = row.get("delta")
    if d is None:
        return "-"
    text = f"{d:+.4g}" if abs(d) >= 1e5 or (d != 0 and abs(d) < 1e-3) else f"{d:+.4f}"
    if d == 0:
        return text
    return f"{text} ({'better' if row.get('improved') else 'worse'})"


def text_table(rows: list[dict[str, Any]]) -> str:
    """Columns: metric, task, model, baseline, delta."""
    header = ["metric", "task", "model", "baseline", "delta"]
    body = [[r["metric"], r.get("task") or "-", _fmt(r["value"]), _fmt(r.get("baseline")), _delta(r)] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in body]
    return "\n".join(lines)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| metric | task | model | baseline | delta |", "|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['metric']} | {r.get('task') or '-'} | {_fmt(r['value'])} | {_fmt(r.get('baseline'))} | "
                     f"{_delta(r)} |")
    return "\n".join(lines)


def gates_markdown(gates: list[dict[str, Any]]) -> str:
    lines = ["| gate | task | result | detail |", "|---|---|---|---|"]
    for g in gates:
        lines.append(f"| {g['gate']} | {g['task']} | {'pass' if g['passed'] else '**FAIL**'} | "
                     f"{g['detail'].replace('|', '/')} |")
    return "\n".join(lines)


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_json(path: Path, doc: dict[str, Any]) -> Path:
    return write_text(path, json.dumps(doc, indent=2, default=str) + "\n")


def chart(rows: list[dict[str, Any]], path: Path, *, title: str, gates: list[dict[str, Any]] | None = None
          ) -> tuple[str | None, str]:
    """(path of the PNG or None, note). A missing matplotlib is a note, not an error."""
    try:
        from adaptkit.verify.chart import draw_deltas

        out = draw_deltas(rows, path, title=title, gates=gates)
    except ImportError:
        return None, "chart not drawn: matplotlib is not installed (it comes with adaptkit-eval)"
    if out is None:
        return None, "no chart: no metric has a baseline value"
    return str(out), ""


def eval_card(doc: dict[str, Any]) -> str:
    """The model-card section of ``adaptkit eval``."""
    lines = ["## Evaluation", ""]
    base = doc.get("baseline")
    lines.append(f"Evaluated with adaptkit {doc.get('adaptkit_version', '')}"
                 + (f" against the baseline `{Path(base).name}`" if base else "") + ".")
    lines += ["", markdown_table(doc["metrics"]), ""]
    if doc.get("chart"):
        lines += [f"![metric deltas vs baseline]({Path(doc['chart']).name})", ""]
    for note in doc.get("notes", []):
        lines.append(f"- {note}")
    sources = {}
    for res in doc.get("results", {}).values():
        for task, info in (res.get("details", {}).get("tasks") or {}).items():
            if isinstance(info, dict) and info.get("attribution"):
                sources[task] = info["attribution"]
    if sources:
        lines += ["", "Task data: " + "; ".join(f"`{t}`: {a}" for t, a in sorted(sources.items())) + "."]
    return "\n".join(lines).rstrip() + "\n"


def verify_card(doc: dict[str, Any]) -> str:
    """The model-card section of ``adaptkit verify``: verdict, checks, gates and the evaluation table."""
    verdict = doc["verdict"]
    lines = ["## Verification", "",
             f"**{verdict.upper()}** — adaptkit {doc.get('adaptkit_version', '')} `verify`"
             + (f" against the baseline `{Path(doc['baseline']).name}`" if doc.get("baseline") else "") + ".", ""]
    lines.append("| check | status | detail |")
    lines.append("|---|---|---|")
    for c in doc["checks"]:
        detail = c["detail"]
        if c["findings"]:
            detail = "; ".join(f["line"] for f in c["findings"][:3])
        lines.append(f"| {c['name']} | {c['status']} | {detail.replace('|', '/')} |")
    load = doc.get("load")
    if load:
        lines += ["", f"Loaded with: **{load.get('route')}** ({load.get('note', '')})."]
    if doc.get("gates"):
        lines += ["", "### Gates", "", gates_markdown(doc["gates"])]
    if doc.get("metrics"):
        lines += ["", "### Evaluation", "", markdown_table(doc["metrics"])]
    if doc.get("chart"):
        lines += ["", f"![metric deltas vs baseline]({Path(doc['chart']).name})"]
    for note in doc.get("notes", []):
        lines.append(f"\n- {note}")
    return "\n".join(lines).rstrip() + "\n"
