"""The train kind: contract (:mod:`adaptkit.train.api`), runner (:mod:`adaptkit.train.runner`), dataset rows
(:mod:`adaptkit.train.data`) and recipes (:mod:`adaptkit.train.recipe`); see ``specs/train.md``."""
