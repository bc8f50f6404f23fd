"""Vocabulary alignment: merging models whose vocabularies differ, by token string (mergekit's rules).

When a config sets ``tokenizer_source`` (``base``, ``union`` or a model) or the ``tokenizer:`` block, the
output vocabulary is that tokenizer's (``union``: the base's tokens, then every other participant's tokens
that have an embedding row, in model order). Each vocabulary-indexed tensor (the embedding, an untied
``lm_head``: non-layer 2-D tensors with one row per token) of every participant is re-indexed to the output
vocabulary *before* the merge method sees it; the method then merges the aligned rows as usual. A token a
model lacks (not in its tokenizer, or its id beyond the model's embedding rows) gets, in that model's aligned
tensor, mergekit's documented default:

* a ``tokenizer.tokens.<tok>.source`` if configured: a model's row of the same token, a model's row by
  ``token_id`` / ``token`` (``kind: model_token``), or zeros (``kind: zero``); with ``force: true`` every model
  uses it, even models that have the token;
* otherwise: the only model that has it; the base model's row if the base has it; the mean of the rows of the
  models that have it; zeros (with a note) when no model has it.

``pad_to_multiple_of`` pads the output vocabulary with rows equal to the mean of the real rows.

Without ``tokenizer_source`` / ``tokenizer:`` (mergekit's "legacy" mode) tensors are merged as stored when
the vocabulary-indexed tensors of all participants have the same number of rows (as before); when they differ,
the rows are aligned to the base's (else first model's) tokenizer, which gives mergekit's truncation result
when the models share that prefix and the right rows when they do not. When every participant's vocabulary
maps onto the output's one-to-one, nothing is re-indexed (the merge is bit-identical to a plain one).

Vocabularies that cannot be aligned (a participant has rows for fewer than half of the output tokens:
different tokenizer families) are an error. Imports no torch at module level.
"""
from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from adaptkit.errors import CheckpointError, ConfigError
from adaptkit.merge.slices import split_layer

#: a non-layer tensor whose name says it is an embedding of positions, not tokens
_POSITION_RE = re.compile(r"(wpe|position|pos_emb)")
_EMBED_RE = re.compile(r"(embed_tokens|wte|word_embeddings|tok_embeddings|embed_in|embeddings)")
MIN_SHARED = 0.5  #: a participant must have rows for at least this fraction of the output tokens


@dataclass
class TokVocab:
    """A tokenizer's vocabulary (from ``tokenizer.json``): token string -> id, and the added-token entries."""

    tokens: dict[str, int]
    added: dict[str, dict[str, Any]]  #: content -> added_tokens entry
    data: dict[str, Any]  #: the whole tokenizer.json
    path: Path


def read_vocab(folder: Path, label: str) -> TokVocab:
    f = Path(folder) / "tokenizer.json"
    if not f.is_file():
        raise CheckpointError(
            f"model {label!r}: aligning vocabularies needs its tokenizer.json (not found in {folder})"
        )
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"model {label!r}: unreadable tokenizer.json: {exc}") from None
    model = data.get("model") or {}
    vocab = model.get("vocab")
    tokens: dict[str, int] = {}
    if isinstance(vocab, dict):
        tokens.update({str(k): int(v) for k, v in vocab.items()})
    elif isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        tokens.update({str(e[0]): i for i, e in enumerate(vocab)})
    else:
        raise CheckpointError(f"model {label!r}: tokenizer.json has no vocabulary ({model.get('type')!r} model)")
    added = {}
    for e in data.get("added_tokens") or []:
        tokens[str(e["content"])] = int(e["id"])
        added[str(e["content"])] = e
    return TokVocab(tokens, added, data, f)


def vocab_tensors(ckpt: Any) -> tuple[Optional[int], list[str]]:
    """(rows, names): the number of embedding rows and the names of the vocabulary-indexed tensors (non-layer
    2-D float tensors with that many rows; position embeddings excluded)."""
    rows = None
    two_d = []
    for n in ckpt.names():
        if split_layer(n) is not None or _POSITION_RE.search(n):
            continue
        info = ckpt.info(n)
        if len(info.shape) != 2 or info.dtype not in ("F64", "F32", "F16", "BF16"):
            continue
        two_d.append((n, tuple(info.shape)))
        if rows is None and _EMBED_RE.search(n):
            rows = info.shape[0]
    if rows is None:
        return None, []
    return rows, [n for n, s in two_d if s[0] == rows]


@dataclass
class Rule:
    """How the default row of one output token is made."""

    kind: str  #: "model" (row of model m for this token), "row" (row r of model m), "zero", "mean"
    model: Optional[int] = None
    row: Optional[int] = None


@dataclass
class VocabAlignment:
    out_tokens: list[str]  #: output id -> token
    out_size: int  #: rows of the aligned tensors (>= len(out_tokens) with padding)
    perms: dict[int, list[int]]  #: model -> output id -> its row for that token, or -1 (absent)
    own: dict[int, list[int]]  #: model -> output id -> the row it contributes, or -1 (absent or forced: default)
    rules: dict[int, Rule]  #: output id -> default-row rule (ids some model lacks, or forced)
    names: dict[int, list[str]]  #: model -> its vocabulary-indexed tensor names
    models: list[int]  #: participants, in merge order
    tokenizer_json: Optional[str] = None  #: the output tokenizer.json when it is built (union)
    added_decoder: dict[str, dict[str, Any]] = field(default_factory=dict)  #: new added tokens (by id)
    notes: list[str] = field(default_factory=list)


def _token_source_model(ref: str, models: Any, participants: list[int], src: str, token: str) -> int:
    mi = models.known(ref)
    if mi is None:
        try:
            mi = models.index(ref)
        except (CheckpointError, ConfigError):
            mi = None
    if mi is None or mi not in participants:
        raise ConfigError(f"{src}: tokenizer.tokens[{token!r}].source: model {ref!r} is not one of the merged models")
    return mi


def plan_alignment(cfg: Any, models: Any, participants: list[int], base: Optional[int], template: int,
                   src: str) -> Optional[VocabAlignment]:
    """The alignment of the participants' vocabulary-indexed tensors, or None when tensors merge as stored."""
    block = cfg.tokenizer
    source = block.source if block is not None else cfg.tokenizer_source
    rows: dict[int, Optional[int]] = {}
    names: dict[int, list[str]] = {}
    for mi in participants:
        rows[mi], names[mi] = vocab_tensors(models[mi].ckpt)
    if any(r is None for r in rows.values()):
        if source is not None or block is not None:
            lacking = next(models.label(mi) for mi, r in rows.items() if r is None)
            raise CheckpointError(f"model {lacking!r}: no token embedding found; cannot align vocabularies")
        return None
    legacy = source is None and block is None
    if legacy and len(set(rows.values())) == 1:
        return None  # same rows everywhere: merged as stored (mergekit's legacy mode)
    label = models.label
    vocabs = {mi: read_vocab(models[mi].path if models[mi].path.is_dir() else models[mi].path.parent, label(mi))
              for mi in participants}
    notes: list[str] = []
    new_added: dict[str, dict[str, Any]] = {}
    tokenizer_json = None
    if legacy or source == "base":
        out_vocab = vocabs[template].tokens
        if legacy:
            notes.append(
                f"vocabulary sizes differ ({', '.join(f'{label(m)}: {r}' for m, r in rows.items())}): embedding rows "
                f"aligned by token string to {label(template)!r}'s tokenizer (mergekit truncates to the smallest)"
            )
    elif source == "union":
        out_vocab, new_added, tokenizer_json = _union(vocabs, rows, participants, template)
    else:
        known = models.known(source)
        if known is not None:
            tv = vocabs.get(known) or read_vocab(models[known].path, label(known))
        else:
            from adaptkit.merge.models import resolve_model_path

            p = resolve_model_path(source, models.base_dir, src)
            tv = read_vocab(p if p.is_dir() else p.parent, source)
        out_vocab = tv.tokens
    out_tokens = [""] * (max(out_vocab.values()) + 1 if out_vocab else 0)
    for tok, i in out_vocab.items():
        out_tokens[i] = tok
    if any(t == "" for t in out_tokens) and "" not in out_vocab:
        raise CheckpointError(f"{src}: the output tokenizer's ids are not contiguous; cannot align vocabularies")
    n = len(out_tokens)
    out_size = n
    pad = block.pad_to_multiple_of if block is not None else None
    if pad and out_size % pad:
        out_size += pad - out_size % pad
    perms: dict[int, list[int]] = {}
    for mi in participants:
        mv = vocabs[mi].tokens
        r = rows[mi]
        perms[mi] = [(j if (j := mv.get(t, -1)) < r else -1) for t in out_tokens]
        have = sum(1 for j in perms[mi] if j >= 0)
        if n and have < MIN_SHARED * n:
            raise CheckpointError(
                f"{src}: vocabularies cannot be aligned: model {label(mi)!r} has rows for only {have} of the "
                f"{n} tokens of the output vocabulary (a different tokenizer family?)"
            )
    token_cfgs = dict(block.tokens or {}) if block is not None else {}
    for tok in token_cfgs:
        if tok not in out_vocab:
            raise ConfigError(f"{src}: tokenizer.tokens: {tok!r} is not a token of the output vocabulary")
    rules: dict[int, Rule] = {}
    forced: list[int] = []
    zero_tokens = []
    for i, tok in enumerate(out_tokens):
        tc = token_cfgs.get(tok)
        have = [mi for mi in participants if perms[mi][i] >= 0]
        configured = None
        if tc is not None and tc.source is not None:  # validated even where not needed
            configured = _configured_rule(tc.source, tok, models, participants, perms, vocabs, rows, i, src)
        if len(have) == len(participants) and not (tc and tc.force):
            continue
        if configured is not None:
            rules[i] = configured
        elif len(have) == 1:
            rules[i] = Rule("model", have[0])
        elif not have:
            rules[i] = Rule("zero")
            zero_tokens.append(tok)
        elif base is not None and base in have:
            rules[i] = Rule("model", base)
        else:
            rules[i] = Rule("mean")
        if tc is not None and tc.force:
            forced.append(i)
    if zero_tokens:
        shown = ", ".join(repr(t) for t in zero_tokens[:4]) + (f", ... ({len(zero_tokens)} in all)" if len(zero_tokens) > 4 else "")
        notes.append(f"{len(zero_tokens)} output tokens have an embedding row in no model; their rows are zeros: {shown}")
    identity = (not rules and out_size == n
                and all(rows[mi] == n and all(perms[mi][i] == i for i in range(n)) for mi in participants))
    if identity:
        return None
    own = {mi: list(p) for mi, p in perms.items()}
    for i in forced:
        for mi in participants:
            own[mi][i] = -1
    return VocabAlignment(out_tokens=out_tokens, out_size=out_size, perms=perms, own=own, rules=rules, names=names,
                          models=list(participants), tokenizer_json=tokenizer_json, added_decoder=new_added,
                          notes=notes)


def _configured_rule(source: Any, tok: str, models: Any, participants: list[int], perms: dict[int, list[int]],
                     vocabs: dict[int, TokVocab], rows: dict[int, Optional[int]], i: int, src: str) -> Rule:
    where = f"{src}: tokenizer.tokens[{tok!r}].source"
    if getattr(source, "kind", None) == "zero":
        return Rule("zero")
    if getattr(source, "kind", None) == "model_token":
        mi = _token_source_model(source.model, models, participants, src, tok)
        if source.token_id is not None:
            row = source.token_id
        else:
            if source.token not in vocabs[mi].tokens:
                raise ConfigError(f"{where}: token {source.token!r} is not in {models.label(mi)!r}'s vocabulary")
            row = vocabs[mi].tokens[source.token]
        if row >= (rows[mi] or 0):
            raise ConfigError(f"{where}: token id {row} is out of range for {models.label(mi)!r} "
                              f"({rows[mi]} embedding rows)")
        return Rule("row", mi, row)
    mi = _token_source_model(str(source), models, participants, src, tok)
    if perms[mi][i] < 0:
        raise ConfigError(f"{where}: model {models.label(mi)!r} has no embedding row for {tok!r}")
    return Rule("row", mi, perms[mi][i])


def _union(vocabs: dict[int, TokVocab], rows: dict[int, Optional[int]], participants: list[int], template: int
           ) -> tuple[dict[str, int], dict[str, dict[str, Any]], str]:
    """mergekit's union: the template's tokens that have rows (ids kept), then every other participant's tokens
    with rows, regular tokens first, in model order; the new ones become added tokens of the output
    tokenizer.json (flags copied from the model that adds them)."""
    tv = vocabs[template]
    r0 = rows[template] or 0
    out = {t: i for t, i in tv.tokens.items() if i < r0}
    if sorted(out.values()) != list(range(len(out))):
        raise CheckpointError("tokenizer_source: union: the base tokenizer's ids with embedding rows are not "
                              "contiguous; cannot build the union")
    order = [template] + [m for m in participants if m != template]
    regular: list[tuple[str, dict[str, Any] | None]] = []
    added: list[tuple[str, dict[str, Any]]] = []
    seen = set(out)
    for mi in order:
        v = vocabs[mi]
        for tok, i in sorted(v.tokens.items(), key=lambda kv: kv[1]):
            if i >= (rows[mi] or 0) or tok in v.added or tok in seen:
                continue
            seen.add(tok)
            regular.append((tok, None))
    for mi in order:
        v = vocabs[mi]
        for tok, e in sorted(v.added.items(), key=lambda kv: int(kv[1]["id"])):
            if int(e["id"]) >= (rows[mi] or 0) or tok in seen:
                continue
            seen.add(tok)
            added.append((tok, e))
    data = json.loads(json.dumps(tv.data))
    data["added_tokens"] = [e for e in data.get("added_tokens") or [] if int(e["id"]) < r0]
    new_added: dict[str, dict[str, Any]] = {}
    nxt = len(out)
    for tok, e in regular + added:
        entry = {"id": nxt, "content": tok, "single_word": bool(e.get("single_word", False)) if e else False,
                 "lstrip": bool(e.get("lstrip", False)) if e else False,
                 "rstrip": bool(e.get("rstrip", False)) if e else False,
                 "normalized": bool(e.get("normalized", True)) if e else True,
                 "special": bool(e.get("special", False)) if e else False}
        data["added_tokens"].append(entry)
        new_added[str(nxt)] = {k: v for k, v in entry.items() if k != "id"}
        out[tok] = nxt
        nxt += 1
    return out, new_added, json.dumps(data, ensure_ascii=False, indent=2)


class Aligner:
    """Builds the aligned tensors (fp32, or fp64 for fp64 inputs) of each participant; default rows of a
    tensor are computed once and shared by every model."""

    def __init__(self, al: VocabAlignment, ckpts: dict[int, Any]) -> None:
        self.al = al
        self.ckpts = ckpts
        self._lock = threading.Lock()
        self._defaults: dict[str, Any] = {}

    def _src(self, mi: int, name: str) -> Any:
        ck = self.ckpts[mi]
        getter = getattr(ck, "get_fp32", None)
        return getter(name) if callable(getter) else ck.get(name)

    def _default_rows(self, name: str, dtype: Any) -> dict[int, Any]:
        import torch

        with self._lock:
            if name in self._defaults:
                return self._defaults[name]
            al = self.al
            out: dict[int, Any] = {}
            srcs: dict[int, Any] = {}

            def src(mi: int) -> Any:
                if mi not in srcs:
                    srcs[mi] = self._src(mi, name)
                return srcs[mi]

            for i, rule in al.rules.items():
                if rule.kind == "zero":
                    hidden = src(al.models[0]).shape[1]
                    out[i] = torch.zeros(hidden, dtype=dtype)
                elif rule.kind == "model":
                    out[i] = src(rule.model)[al.perms[rule.model][i]].to(dtype)
                elif rule.kind == "row":
                    out[i] = src(rule.model)[rule.row].to(dtype)
                else:  # mean of the models that have the token
                    acc = None
                    cnt = 0
                    for mi in al.models:
                        j = al.perms[mi][i]
                        if j >= 0:
                            r = src(mi)[j].to(torch.float64)
                            acc = r if acc is None else acc + r
                            cnt += 1
                    out[i] = (acc / cnt).to(dtype)
            self._defaults = {name: out}  # one tensor at a time
            return out

    def aligned(self, mi: int, name: str) -> Any:
        import torch

        al = self.al
        raw = self._src(mi, name)
        dtype = torch.float64 if raw.dtype == torch.float64 else torch.float32
        n = len(al.out_tokens)
        out = torch.zeros((al.out_size, raw.shape[1]), dtype=dtype)
        perm = torch.tensor(al.own[mi], dtype=torch.long)
        have = (perm >= 0).nonzero().reshape(-1)
        if have.numel():
            out[have] = raw[perm[have]].to(dtype)
        defaults = self._default_rows(name, dtype)
        for i, row in defaults.items():
            if al.own[mi][i] < 0:
                out[i] = row
        if al.out_size > n:
            out[n:] = out[:n].to(torch.float64).mean(dim=0).to(dtype)
        return out


class AlignedCheckpoint:
    """A participant seen through the alignment: its vocabulary-indexed tensors have the output vocabulary's
    rows (computed on read, fp32); everything else is the wrapped checkpoint's."""

    def __init__(self, ckpt: Any, aligner: Aligner, mi: int) -> None:
        from adaptkit.io import TensorInfo

        self._ckpt = ckpt
        self._aligner = aligner
        self._mi = mi
        self._infos = {}
        for name in aligner.al.names[mi]:
            i = ckpt.info(name)
            shape = (aligner.al.out_size, i.shape[1])
            from adaptkit.io.dtypes import ITEMSIZE

            self._infos[name] = TensorInfo(name, i.dtype, shape, i.file, -1, shape[0] * shape[1] * ITEMSIZE[i.dtype])

    def __getattr__(self, item: str) -> Any:
        return getattr(self._ckpt, item)

    def __contains__(self, name: object) -> bool:
        return name in self._ckpt

    def __iter__(self):
        return iter(self._ckpt.names())

    def __len__(self) -> int:
        return len(self._ckpt.names())

    def names(self) -> list[str]:
        return self._ckpt.names()

    def info(self, name: str) -> Any:
        return self._infos[name] if name in self._infos else self._ckpt.info(name)

    def get(self, name: str, **kw: Any) -> Any:
        if name in self._infos:
            from adaptkit.io.dtypes import torch_dtype

            return self._aligner.aligned(self._mi, name).to(torch_dtype(self._infos[name].dtype))
        return self._ckpt.get(name, **kw)

    def get_fp32(self, name: str) -> Any:
        """The aligned tensor in fp32 (fp64 for fp64 inputs) so the merge rounds once; other tensors as stored
        (the engine upcasts them)."""
        if name in self._infos:
            return self._aligner.aligned(self._mi, name)
        getter = getattr(self._ckpt, "get_fp32", None)
        return getter(name) if callable(getter) else self._ckpt.get(name)

    def close(self) -> None:
        self._ckpt.close()


def apply_alignment(al: VocabAlignment, models: Any) -> None:
    """Wrap every participant's checkpoint in an :class:`AlignedCheckpoint` (in place)."""
    ckpts = {mi: models[mi].ckpt for mi in al.models}
    aligner = Aligner(al, ckpts)
    for mi in al.models:
        entry = models[mi]
        entry.ckpt = AlignedCheckpoint(entry.ckpt, aligner, mi)
        entry.decoded_on_read = True


def write_union_tokenizer(folder: Path, al: VocabAlignment) -> None:
    """The union ``tokenizer.json``, and its new added tokens in a copied ``tokenizer_config.json``."""
    folder = Path(folder)
    (folder / "tokenizer.json").write_text(al.tokenizer_json or "", encoding="utf-8")
    tc = folder / "tokenizer_config.json"
    if tc.is_file() and al.added_decoder:
        try:
            data = json.loads(tc.read_text(encoding="utf-8"))
        except ValueError:
            return
        if isinstance(data, dict) and isinstance(data.get("added_tokens_decoder"), dict):
            data["added_tokens_decoder"].update(al.added_decoder)
            tc.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
