"""Merge math (pure tensor functions, no I/O), the merge planner and the streaming merge engine.

Contract with merge methods: ``api`` (:class:`~adaptkit.merge.api.MergeInputs`, per-tensor seeds). What the
engine may do with a method is declared on its :class:`~adaptkit.registry.MergeMethod` (``row_separable``,
``propagates_nonfinite``, ``in_place``, ``identity_params``), never inferred from its name.

Planning (headers only, no torch):

* ``models`` -- model references, paths, opening through the host's loader registry (``ModelSet``);
* ``params`` -- parameter validation, scopes, filters and gradients per tensor;
* ``slices`` -- layer stacks, slices and layer ranges: which input tensors make which output tensor;
* ``tied`` -- tied input/output embeddings;
* ``output_config`` -- the output's ``config.json``;
* ``aux_sources`` -- tokenizer source and chat template (what accompanies the weights);
* ``tasks`` -- :class:`~adaptkit.merge.tasks.TensorTask`, one output tensor;
* ``budget`` -- prefetch / row-block limits and the peak-memory estimate;
* ``plan`` -- :class:`~adaptkit.merge.plan.MergePlan` and ``build_plan`` (the orchestration).

Running: ``executor`` (one tensor: read, upcast, NaN/Inf check, call the method, round once), ``runtime``
(allocator/OpenMP/thread settings), ``card`` (model card and provenance), ``engine`` (the pipeline, the one
publisher, ``run_merge_step`` through ``adaptkit_run_step``, and the library entry ``merge``).

Math modules (formulas and defaults: specs/merge-math.md): ``linear`` (linear, passthrough), ``slerp``
(slerp, nuslerp), ``task_arithmetic`` (task_arithmetic, ties, dare_*, breadcrumbs*, della*),
``sparsify`` (trim/drop masks), ``consensus`` (TIES sign election), ``model_stock``, ``_util``
(chunking, thread-count-independent sums). None of them imports torch at module import time.
"""
