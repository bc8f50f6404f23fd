"""The shipped tasks, as :class:`adaptkit.evaluate.api.TaskSpec` per evaluator.

Task definitions are the lm-eval YAML files in ``adaptkit_eval/tasks`` (the folder lm-eval reads through
``include_path``); adaptkit's own information sits under ``metadata.adaptkit``::

    metadata:
      adaptkit:
        kind: text | multiple_choice
        builder: flores_eng            # adaptkit_eval.data.BUILDERS key
        evaluators: {perplexity: [quick, standard], agreement: [quick], lmeval: [lmeval]}
        attribution: "..."

``evaluators`` says which evaluators run the task and, per evaluator, the suites it belongs to; the first
evaluator listed is the task's default (``adaptkit eval --tasks flores_eng``). Probe files are the
``adaptkit_eval/probes/*.jsonl`` files (task name = file stem, evaluator ``probes``, suites quick/standard).

Each evaluator's implementation function carries ``tasks()`` (the TaskSpecs it offers) and
``resolve_task(name)``; ``adaptkit eval``/``verify`` read them to list tasks, resolve names and build suites.
Nothing here imports torch or lm-eval.
"""
from __future__ import annotations

import difflib
import functools
from pathlib import Path
from typing import Any

from adaptkit.errors import ConfigError
from adaptkit.evaluate.api import TaskSpec

PACKAGE_DIR = Path(__file__).resolve().parent
TASKS_DIR = PACKAGE_DIR / "tasks"
PROBES_DIR = PACKAGE_DIR / "probes"
PROBE_SUITES = ("quick", "standard")


def _yaml_loader() -> Any:
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def function(loader: Any, node: Any) -> str:  # lm-eval's ``!function`` tag: keep the reference
        return "!function " + str(loader.construct_scalar(node))

    Loader.add_constructor("!function", function)
    return Loader


def read_task_yaml(path: Path) -> dict[str, Any]:
    """A task YAML as a dict (``!function x.y`` kept as the string ``"!function x.y"``)."""
    import yaml

    try:
        doc = yaml.load(path.read_text(encoding="utf-8"), Loader=_yaml_loader())  # noqa: S506 - SafeLoader subclass
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read task definition ({' '.join(str(e).split())})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("task"), str):
        raise ConfigError(f"{path}: a task definition must be a mapping with a 'task' name")
    return doc


@functools.lru_cache(maxsize=None)
def _shipped() -> tuple[tuple[str, TaskSpec, tuple[tuple[str, tuple[str, ...]], ...]], ...]:
    out = []
    for path in sorted(TASKS_DIR.glob("*.yaml")):
        doc = read_task_yaml(path)
        ak = ((doc.get("metadata") or {}).get("adaptkit")) or {}
        evaluators = tuple((str(ev), tuple(suites or ())) for ev, suites in (ak.get("evaluators") or {}).items())
        options = {"kind": ak.get("kind", "text"), "builder": ak.get("builder", doc["task"]),
                   "attribution": ak.get("attribution", ""), "source": ak.get("source", ""),
                   "default_evaluator": evaluators[0][0] if evaluators else "lmeval"}
        out.append((doc["task"], TaskSpec(doc["task"], path, options), evaluators))
    for path in sorted(PROBES_DIR.glob("*.jsonl")):
        options = {"kind": "probes", "attribution": "adaptkit-eval (Apache-2.0)", "source": str(path.name),
                   "default_evaluator": "probes"}
        out.append((path.stem, TaskSpec(path.stem, path, options), (("probes", PROBE_SUITES),)))
    return tuple(out)


def tasks_for(evaluator: str) -> tuple[TaskSpec, ...]:
    """The shipped tasks ``evaluator`` runs; ``options["suites"]`` lists the suites each belongs to."""
    specs = []
    for _name, spec, evaluators in _shipped():
        for ev, suites in evaluators:
            if ev == evaluator:
                specs.append(TaskSpec(spec.name, spec.path, {**spec.options, "suites": list(suites)}))
    return tuple(specs)


def default_for(evaluator: str) -> tuple[TaskSpec, ...]:
    """What ``evaluator`` runs when a request names no task: its tasks in the ``quick`` suite (else the first)."""
    offered = tasks_for(evaluator)
    return tuple(s for s in offered if "quick" in s.options.get("suites", ())) or offered[:1]


def resolve(evaluator: str, name: str | TaskSpec, *, kinds: tuple[str, ...] = ()) -> TaskSpec:
    """The TaskSpec for ``name`` under ``evaluator``: a shipped task, or a path to a user's file (a text or
    JSONL file for text evaluators, a JSONL probe file for ``probes``). One-line ConfigError otherwise."""
    if isinstance(name, TaskSpec):
        if name.options.get("kind"):  # already resolved (adaptkit eval passes the specs it got from tasks())
            return name
        return resolve(evaluator, str(name.path) if name.path is not None else name.name, kinds=kinds)
    offered = {s.name: s for s in tasks_for(evaluator)}
    if name in offered:
        return offered[name]
    p = Path(name).expanduser()
    if p.suffix and (p.exists() or "/" in name or "\\" in name):
        if not p.is_file():
            raise ConfigError(f"task file {p}: no such file")
        kind = "probes" if evaluator == "probes" else "text"
        if kinds and kind not in kinds:
            raise ConfigError(f"task file {p}: evaluator {evaluator!r} does not run {kind} files")
        return TaskSpec(p.stem, p, {"kind": kind, "builder": "file", "source": str(p), "attribution": "user file",
                                    "suites": []})
    close = difflib.get_close_matches(name, list(offered), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"unknown task {name!r} for evaluator {evaluator!r}{hint} "
                      f"(known: {', '.join(sorted(offered)) or 'none'}; or a path to a data file)")


def text_documents(spec: TaskSpec, limit: int | None = None) -> list[str]:
    """The texts of a text task: a shipped builder, or a user's file (``.jsonl`` with a ``text`` field per
    line, otherwise plain UTF-8 text with documents separated by blank lines)."""
    from adaptkit.io.textdata import jsonl_texts

    builder = spec.options.get("builder")
    if builder == "file" or builder is None:
        p = Path(spec.path) if spec.path else None
        if p is None or not p.is_file():
            raise ConfigError(f"task {spec.name!r}: data file {p} does not exist")
        try:
            raw = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: task data is not UTF-8 text ({e.reason} at byte {e.start})") from None
        if p.suffix == ".jsonl":
            texts = jsonl_texts(raw, str(p))
        else:
            texts = [t.strip() for t in raw.split("\n\n") if t.strip()]
        if not texts:
            raise ConfigError(f"{p}: task data has no text")
    else:
        from adaptkit_eval.data import BUILDERS

        if builder not in BUILDERS:
            raise ConfigError(f"{spec.path}: unknown data builder {builder!r} (known: {', '.join(BUILDERS)})")
        texts = [d["text"] for d in BUILDERS[builder]()]
    return texts[:limit] if limit is not None else texts
