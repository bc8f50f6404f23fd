"""Where the output's non-weight files come from: the tokenizer source (``tokenizer_source``) and the chat
template (``chat_template``).

``tokenizer_source``: unset or ``base`` -- the base model (else the first model); ``union`` -- the base's
files with the union ``tokenizer.json`` built by :mod:`adaptkit.merge.vocab`; a model of the merge; or another
local folder with tokenizer files. The chosen source's tokenizer, generation config and chat
template files are copied into the output -- or, for a checkpoint that carries them inside (a GGUF file),
written by its loader (``write_aux``). ``chat_template``: ``auto`` (the most common template among the
inputs), a known name (``chatml``) or a Jinja template. Imports no torch.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from adaptkit.errors import ConfigError
from adaptkit.merge.models import ModelSet, resolve_model_path

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
NAMED_TEMPLATES = {"chatml": CHATML}


@dataclass
class AuxSource:
    """The folder (or checkpoint file) the auxiliary files come from, and the model it is, if any."""

    path: Path
    model: Optional[int] = None  #: index into the plan's models, when the source is one of them


def resolve_aux_source(tokenizer_source: Optional[str], models: ModelSet, default: int, participants: list[int],
                       has_base: bool, src: str) -> AuxSource:
    """``default``: the template model (base, else first); ``participants``: every model taking part."""
    ts = tokenizer_source
    if ts is None or ts == "base":
        if ts == "base" and not has_base:
            raise ConfigError(f"{src}: tokenizer_source: base needs a base_model")
        return AuxSource(models[default].path, default)
    if ts == "union":
        # the template's files; the union's tokenizer.json (when the vocabularies differ) is written by the
        # engine from the plan's vocabulary alignment (adaptkit.merge.vocab)
        return AuxSource(models[default].path, default)
    known = models.known(ts)
    if known is not None:
        return AuxSource(models[known].path, known)
    path = resolve_model_path(ts, models.base_dir, src)  # a tokenizer-only folder is fine
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise ConfigError(f"{src}: tokenizer_source {ts!r} has no tokenizer files (tokenizer.json)")
    return AuxSource(path, None)


def write_aux_files(pub: Any, aux: Optional[AuxSource], models: list[Any]) -> None:
    """Copy (or have the loader write) the tokenizer / generation config / chat template files into the
    publication ``pub``; ``config.json`` is the plan's own."""
    if aux is None:
        return
    ckpt = models[aux.model].ckpt if aux.model is not None else None
    if ckpt is not None and callable(getattr(ckpt, "write_aux", None)):
        pub.copy_aux(ckpt, config=False)
    elif aux.path.is_dir():
        pub.copy_aux(aux.path, config=False)


def model_chat_template(path: Path) -> Optional[str]:
    """The chat template a model folder carries (``chat_template.jinja`` or in ``tokenizer_config.json``)."""
    j = path / "chat_template.jinja"
    if j.is_file():
        return j.read_text(encoding="utf-8")
    tc = path / "tokenizer_config.json"
    if tc.is_file():
        try:
            v = json.loads(tc.read_text(encoding="utf-8")).get("chat_template")
        except (ValueError, OSError):
            return None
        if isinstance(v, str):
            return v
    return None


def resolve_chat_template(chat_template: Optional[str], model_paths: list[Path]) -> Optional[str]:
    ct = chat_template
    if not ct:
        return None
    if ct == "auto":
        found = Counter(t for p in model_paths if p.is_dir() and (t := model_chat_template(p)))
        if not found:
            raise ConfigError("chat_template: auto: none of the input models has a chat template")
        return found.most_common(1)[0][0]
    if ct in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[ct]
    if "{" in ct:
        return ct
    raise ConfigError(
        f"chat_template {ct!r} is not a Jinja template nor a known name (known: auto, {', '.join(NAMED_TEMPLATES)})"
    )


def write_chat_template(folder: Path, template: str) -> None:
    """``chat_template.jinja``, and the template inside a copied ``tokenizer_config.json`` that has one."""
    (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
    tc = folder / "tokenizer_config.json"
    if tc.is_file():
        try:
            data = json.loads(tc.read_text(encoding="utf-8"))
        except ValueError:
            data = None
        if isinstance(data, dict) and "chat_template" in data:
            data["chat_template"] = template
            tc.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
