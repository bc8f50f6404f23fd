"""The PNG chart of metric deltas against the baseline (``adaptkit eval --baseline`` and ``adaptkit verify``).

One horizontal bar per (metric, task): the change relative to the baseline in percent (symmetric log
scale, so small and large changes are both visible), green where the model is better, red where it is worse;
both values and the delta are listed beside each bar; a dashed mark shows a gate's limit on the same scale. Metrics whose baseline is 0 (KL divergence) have no relative change: they get an annotation only.
Drawn with matplotlib's Agg backend (a dependency of adaptkit-eval), imported here only.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def _gate_x(gate: dict[str, Any], row: dict[str, Any]) -> float | None:
    """A gate's limit in the chart's unit (percent change vs baseline) for ``row``, when it has one."""
    base, thr, op = row.get("baseline"), gate.get("threshold"), gate.get("op", "")
    if base in (None, 0) or thr is None:
        return None
    if op.startswith("delta"):
        return 100.0 * thr / abs(base)
    return 100.0 * (thr - base) / abs(base)


def draw_deltas(rows: list[dict[str, Any]], path: Path, *, title: str,
                gates: list[dict[str, Any]] | None = None) -> Path | None:
    """Write the chart to ``path``; ``None`` (nothing written) when no row has a baseline. Raises ImportError
    when matplotlib is missing (the caller reports it)."""
    rows = [r for r in rows if r.get("baseline") is not None and r.get("value") is not None]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    labels, xs, colors, notes = [], [], [], []
    for r in rows:
        base, val = r["baseline"], r["value"]
        delta = val - base
        labels.append(f"{r['metric']} ({r['task']})" if r.get("task") else r["metric"])
        rel = 100.0 * delta / abs(base) if base != 0 else 0.0
        xs.append(rel)
        better = (delta >= 0) == bool(r.get("higher_is_better"))
        colors.append("#9e9e9e" if delta == 0 else ("#2e7d32" if better else "#c62828"))
        notes.append(f"{val:.4g} vs {base:.4g} ({delta:+.3g}" + (f", {rel:+.3g}%)" if base != 0 else ")"))
    n = len(rows)
    fig, ax = plt.subplots(figsize=(11.0, 1.3 + 0.5 * n), dpi=110)
    ys = list(range(n))[::-1]
    ax.barh(ys, xs, color=colors, height=0.6)
    ax.axvline(0, color="black", linewidth=0.8)
    span = max([abs(x) for x in xs] + [1e-6])
    for g in gates or []:
        for y, r in zip(ys, rows):
            if g.get("metric") == r["metric"] and g.get("task") == r.get("task"):
                gx = _gate_x(g, r)
                if gx is not None:
                    span = max(span, abs(gx))
                    ax.plot([gx, gx], [y - 0.42, y + 0.42], linestyle="--", color="#37474f", linewidth=1.2)
                    ax.text(gx, y + 0.45, "gate " + ("pass" if g.get("passed") else "FAIL"), fontsize=7,
                            ha="center", va="bottom", color="#37474f")
    # symmetric log scale: a 0.01 % change stays visible next to a 15 % one (linear within +-0.01 %)
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlim(-1.5 * span, 1.5 * span)
    trans = matplotlib.transforms.blended_transform_factory(ax.transAxes, ax.transData)
    for y, note in zip(ys, notes):  # values in a column right of the plot
        ax.text(1.02, y, note, transform=trans, va="center", ha="left", fontsize=8)
    ax.set_yticks(ys)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_ylim(-0.7, n - 0.3)
    ax.set_xlabel("change vs baseline (%, symmetric log scale)   green: better, red: worse")
    ax.set_title(title, fontsize=9)
    fig.subplots_adjust(left=0.22, right=0.70)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path
