"""Merge math (pure tensor functions, no I/O) and the streaming merge engine.

Math modules (formulas and defaults: specs/merge-math.md): ``linear`` (linear, passthrough), ``slerp``
(slerp, nuslerp), ``task_arithmetic`` (task_arithmetic, ties, dare_*, breadcrumbs*, della*),
``sparsify`` (trim/drop masks), ``consensus`` (TIES sign election), ``model_stock``, ``_util``
(chunking, thread-count-independent sums). None of them imports torch at module import time.
"""
