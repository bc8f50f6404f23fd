"""Run mergekit 0.1.5 in-process on a config mapping (tests only; mergekit is a dev dependency, never
imported by adaptkit). Not a test module."""
from __future__ import annotations

import os
from pathlib import Path


def run_mergekit(cfg: dict, out: Path, seed: int = 0, *, copy_tokenizer: bool = False) -> Path:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(MergeConfiguration.model_validate(cfg), str(out),
              options=MergeOptions(copy_tokenizer=copy_tokenizer, quiet=True, random_seed=seed,
                                   write_model_card=False, lazy_unpickle=False))
    return Path(out)
