"""adaptkit-eval: evaluators for adaptkit (``perplexity``, ``lmeval``, ``probes``, ``agreement``).

Registered through the ``adaptkit`` entry point (:mod:`adaptkit_eval.plugin`). Task definitions live in
``adaptkit_eval/tasks`` (lm-eval YAML, usable with lm-eval's ``include_path``); their data is built at run
time from installed packages (:mod:`adaptkit_eval.data`, attribution in ``tasks/NOTICE.md``). Importing this
package imports neither torch nor lm-eval.
"""
from __future__ import annotations

__version__ = "0.1.0"
