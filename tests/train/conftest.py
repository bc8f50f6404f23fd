"""Helpers for the train tests: recipes written next to tiny models, runs in-process through the runner."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "train"
DATA = EXAMPLES / "data"


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_recipe(path: Path, **doc: Any) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def chat_rows(n: int = 16) -> list[dict[str, Any]]:
    return [{"messages": [{"role": "user", "content": f"What is {a} + {a}?"},
                          {"role": "assistant", "content": str(2 * a)}]} for a in range(10, 10 + n)]


@pytest.fixture
def train_host(adaptkit_pm_factory):
    """A plugin host with the installed plugins (adaptkit-trl among them)."""
    return adaptkit_pm_factory()


def run_recipe(host: Any, recipe: Path, out: Path, *overrides: str, **kw: Any) -> Any:
    """Load ``recipe`` (with ``--set``-style overrides) and run it through the runner, in-process."""
    from adaptkit.train.recipe import load_recipe, recipe_to_request
    from adaptkit.train.runner import run_train

    rec, raw = load_recipe(recipe, overrides)
    req = recipe_to_request(rec, root=recipe.resolve().parent, source=recipe.name, raw=raw)
    return run_train(req, out, host=host, **kw)


def read_log(out: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines() if x.strip()]
