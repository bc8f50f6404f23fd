"""What a merge output says about itself: the model card (``README.md``) and the provenance recorded in
``adaptkit.json`` (both written by the publisher, :mod:`adaptkit.io.publish`).

Provenance names every input by path, loader, source format and the names and sizes of its files; input
files are not hashed (a merge stays close to the speed of reading its inputs; ``adaptkit-manifest.json``
holds the sha256 of every *output* file). Imports no torch.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Mapping


def _loader_note(m: Any) -> str:
    note = m.loader
    if m.dequantized:
        note += f", dequantized from {m.source_format}"
    return note


def model_card(plan: Any, recipe: str, stats: Mapping[str, int]) -> str:
    """The README.md of a merged model: method, inputs (with their loaders), the resolved recipe, statistics
    and the input tensors left out."""
    from adaptkit import __version__

    merged = plan.merged_models
    models = "\n".join(
        f"* `{m.path}`" + (" (base)" if i == plan.base_index else "") + f" — loader {_loader_note(m)}"
        + ("" if i in merged else " — not merged (gives config.json and tokenizer files only)")
        for i, m in enumerate(plan.models)
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


def provenance(plan: Any, *, settings: Mapping[str, Any], result: Mapping[str, Any]) -> dict[str, Any]:
    """The merge's part of ``adaptkit.json``."""
    inputs = []
    merged = plan.merged_models
    for i, m in enumerate(plan.models):
        inputs.append({**m.describe(), "base": i == plan.base_index, "merged": i in merged, "files": m.files()})
    return {
        "method": plan.method_name,
        "method_qualified": plan.method_qualified,
        "seed": plan.seed,
        "config": plan.resolved_config().model_dump(exclude_none=True, mode="json"),
        "inputs": inputs,
        "excluded": len(plan.excluded),
        "settings": dict(settings),
        "result": dict(result),
    }

