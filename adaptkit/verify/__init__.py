"""``adaptkit verify`` and the shared machinery of ``adaptkit eval``: static checks of a checkpoint (no model
code runs), a strict load check, release gates against a baseline, reports (JSON, model-card section, PNG).

Modules: :mod:`~adaptkit.verify.static` (files, headers, index, config, tokenizer, quantization, values,
manifest), :mod:`~adaptkit.verify.load` (strict transformers load; deployment route for quantized
checkpoints), :mod:`~adaptkit.verify.gates` (``gates.yml``), :mod:`~adaptkit.verify.evaluation` (task
planning and evaluator runs), :mod:`~adaptkit.verify.report` / :mod:`~adaptkit.verify.chart` (outputs),
:mod:`~adaptkit.verify.run` (the command's flow). Importing this package imports no torch. Rules, schema and
exit codes: specs/verify.md.
"""
from __future__ import annotations
