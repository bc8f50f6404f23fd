"""The ``probes`` evaluator: greedy generations from a prompt file, each checked by exact match, a regular
expression or JSON-schema validity.

A probe file is JSON Lines, one probe per line::

    {"id": "capital_france", "prompt": "What is the capital of France?", "regex": "(?i)\\bparis\\b"}
    {"id": "yes", "prompt": "Answer with yes or no: is 7 odd?", "exact": "Yes", "max_new_tokens": 4}
    {"id": "json_person", "messages": [{"role": "user", "content": "..."}], "json_schema": {"type": "object"}}

Keys: ``id`` (unique), ``prompt`` (text) or ``messages`` (chat turns), optional ``system``; exactly one check:
``exact`` (the generation, stripped of surrounding whitespace, equals it), ``regex`` (``re.search`` finds it)
or ``json_schema`` (the generation -- or, when it contains a Markdown code fence, the first fenced block --
parses as JSON and validates against the schema, draft 2020-12); optional ``max_new_tokens`` (default 64) and ``chat`` (default:
use the tokenizer's chat template when it has one). Generation is greedy (``do_sample=False``) and stops at
EOS. The metric is ``pass_rate`` per file; every probe's output and verdict are in ``details["probes"]``.

Probes whose prompts have the same number of tokens and the same ``max_new_tokens`` are generated together,
up to ``BATCH`` at a time: no padding is needed, so each row is the computation of its own greedy decoding
(a row's reply ends at its first EOS, as when generated alone) for a fraction of the calls.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from adaptkit.errors import ConfigError
from adaptkit.evaluate.api import EvalRequest, EvalResult, Metric, TaskSpec
from adaptkit.registry import Param

METRICS = (("pass_rate", True),)
PARAMS = (
    Param("dtype", str, "float32", scope="global", choices=("float32", "bfloat16", "float16"),
          help="compute dtype of the model"),
)
CHECKS = ("exact", "regex", "json_schema")
_KEYS = {"id", "prompt", "messages", "system", "max_new_tokens", "chat", *CHECKS}


def default_tasks() -> tuple[TaskSpec, ...]:
    from adaptkit_eval import catalog

    return catalog.tasks_for("probes")


def read_probes(path: Path) -> list[dict[str, Any]]:
    """Parse and validate a probe file (one-line ConfigError naming the file, line and rule)."""
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: probe file does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the probe file ({e})") from None
    probes: list[dict[str, Any]] = []
    seen: set[str] = set()
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("//"):
            continue
        where = f"{path}:{lineno}"
        try:
            p = json.loads(line)
        except ValueError as e:
            raise ConfigError(f"{where}: not valid JSON ({e.msg}); one probe object per line") from None
        if not isinstance(p, dict):
            raise ConfigError(f"{where}: a probe must be a JSON object")
        unknown = sorted(set(p) - _KEYS)
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(_KEYS))})")
        pid = p.get("id")
        if not isinstance(pid, str) or not pid:
            raise ConfigError(f"{where}: every probe needs a string 'id'")
        if pid in seen:
            raise ConfigError(f"{where}: probe id {pid!r} is used twice")
        seen.add(pid)
        if ("prompt" in p) == ("messages" in p):
            raise ConfigError(f"{where}: probe {pid!r} needs exactly one of 'prompt' or 'messages'")
        if "prompt" in p and not isinstance(p["prompt"], str):
            raise ConfigError(f"{where}: probe {pid!r}: 'prompt' must be a string")
        if "messages" in p and not (isinstance(p["messages"], list) and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in p["messages"]) and p["messages"]):
            raise ConfigError(f"{where}: probe {pid!r}: 'messages' must be a list of {{role, content}} strings")
        checks = [c for c in CHECKS if c in p]
        if len(checks) != 1:
            raise ConfigError(f"{where}: probe {pid!r} needs exactly one check of {', '.join(CHECKS)}")
        check = checks[0]
        if check in ("exact", "regex") and not isinstance(p[check], str):
            raise ConfigError(f"{where}: probe {pid!r}: {check!r} must be a string")
        if check == "regex":
            try:
                re.compile(p["regex"])
            except re.error as e:
                raise ConfigError(f"{where}: probe {pid!r}: invalid regex ({e})") from None
        if check == "json_schema":
            if not isinstance(p["json_schema"], (dict, bool)):
                raise ConfigError(f"{where}: probe {pid!r}: 'json_schema' must be a JSON schema object")
            from jsonschema import Draft202012Validator
            from jsonschema.exceptions import SchemaError

            try:
                Draft202012Validator.check_schema(p["json_schema"])
            except SchemaError as e:
                raise ConfigError(f"{where}: probe {pid!r}: invalid JSON schema ({e.message})") from None
        mnt = p.get("max_new_tokens", 64)
        if isinstance(mnt, bool) or not isinstance(mnt, int) or not 1 <= mnt <= 4096:
            raise ConfigError(f"{where}: probe {pid!r}: 'max_new_tokens' must be an integer in 1..4096")
        if "chat" in p and not isinstance(p["chat"], bool):
            raise ConfigError(f"{where}: probe {pid!r}: 'chat' must be true or false")
        probes.append({**p, "check": check, "max_new_tokens": mnt})
    if not probes:
        raise ConfigError(f"{path}: the probe file has no probes")
    return probes


_FENCE = re.compile(r"```[A-Za-z0-9_-]*[ \t]*\n(.*?)\n?```", re.S)


def check_output(probe: dict[str, Any], text: str) -> tuple[bool, str]:
    """(passed, reason) for one generation."""
    check = probe["check"]
    if check == "exact":
        ok = text.strip() == probe["exact"]
        return ok, "exact match" if ok else f"expected exactly {probe['exact']!r}"
    if check == "regex":
        ok = re.search(probe["regex"], text) is not None
        return ok, "regex found" if ok else f"no match for /{probe['regex']}/"
    body = text.strip()
    m = _FENCE.search(body)
    if m:  # a Markdown code fence: its content is the answer (chat models fence JSON and comment after it)
        body = m.group(1).strip()
    try:
        doc = json.loads(body)
    except ValueError as e:
        return False, f"not JSON ({e.msg} at char {e.pos})"
    from jsonschema import Draft202012Validator

    errors = sorted(Draft202012Validator(probe["json_schema"]).iter_errors(doc), key=lambda e: list(e.path))
    if errors:
        where = "/".join(map(str, errors[0].path)) or "(root)"
        return False, f"schema: {where}: {errors[0].message}"
    return True, "valid JSON for the schema"


def prompt_ids(tokenizer: Any, probe: dict[str, Any]) -> list[int]:
    use_chat = probe.get("chat", getattr(tokenizer, "chat_template", None) is not None)
    if use_chat:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ConfigError(f"probe {probe['id']!r} asks for the chat template and the tokenizer has none")
        messages = list(probe.get("messages") or [{"role": "user", "content": probe["prompt"]}])
        if probe.get("system"):
            messages.insert(0, {"role": "system", "content": probe["system"]})
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if "messages" in probe:
        text = "\n".join(m["content"] for m in probe["messages"])
    else:
        text = probe["prompt"]
    if probe.get("system"):
        text = probe["system"] + "\n" + text
    return list(tokenizer(text)["input_ids"])


BATCH = 16  #: probes of one prompt length generated together


def generate_same_length(model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
    """Greedy replies to prompts of one token length (no padding), each cut at its first EOS."""
    import torch

    if len({len(p) for p in prompts}) != 1:
        raise ValueError("generate_same_length: prompts must have the same number of tokens")
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    x = torch.tensor(prompts, dtype=torch.long, device=model.device)
    with torch.inference_mode():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                             do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=pad,
                             eos_token_id=eos)
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
    texts = []
    for row in out[:, x.shape[1]:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))  # rows finished early are padded
        texts.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
    return texts


def generate_all(model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: list[int],
                 on_done: Any = None) -> list[str]:
    """Replies to every prompt, generated in batches of equal prompt length and ``max_new_tokens``."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (p, m) in enumerate(zip(prompts, max_new_tokens)):
        groups.setdefault((len(p), m), []).append(i)
    texts: list[str] = [""] * len(prompts)
    for (_, m), idx in groups.items():
        for k in range(0, len(idx), BATCH):
            part = idx[k:k + BATCH]
            for i, text in zip(part, generate_same_length(model, tokenizer, [prompts[i] for i in part], m)):
                texts[i] = text
            if on_done is not None:
                on_done(len(part))
    return texts


def evaluate(request: EvalRequest) -> EvalResult:
    from adaptkit_eval import catalog, modeling

    t0 = time.perf_counter()
    specs = [catalog.resolve("probes", t, kinds=("probes",)) for t in (request.tasks or catalog.default_for("probes"))]
    files = [(spec, read_probes(Path(spec.path))) for spec in specs]  # validate every file before loading
    lm = modeling.load(request.model, host=request.host, device=request.device, dtype=request.options["dtype"])
    total = sum(len(p[: request.limit] if request.limit else p) for _, p in files)
    done = 0
    result = EvalResult(evaluator="probes")
    result.details["loaded_with"] = lm.route

    def advance(n: int) -> None:
        nonlocal done
        done += n
        request.report(done, total)

    for spec, probes in files:
        rows = []
        chosen = probes[: request.limit] if request.limit else probes
        texts = generate_all(lm.model, lm.tokenizer, [prompt_ids(lm.tokenizer, p) for p in chosen],
                             [p["max_new_tokens"] for p in chosen], on_done=advance)
        for probe, text in zip(chosen, texts):
            ok, reason = check_output(probe, text)
            rows.append({"id": probe["id"], "check": probe["check"], "passed": ok, "reason": reason, "output": text})
        result.metrics.append(Metric("pass_rate", sum(r["passed"] for r in rows) / len(rows), True, task=spec.name,
                                     n=len(rows)))
        result.details.setdefault("probes", {})[spec.name] = rows
        if request.output is not None:
            path = modeling.detail_path(request, f"probes-{spec.name}")
            path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
            result.artifacts[f"probes-{spec.name}"] = str(path)
    result.seconds = time.perf_counter() - t0
    return result


evaluate.tasks = default_tasks  # type: ignore[attr-defined]
