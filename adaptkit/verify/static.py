"""Static checks of a checkpoint folder: files, headers, index, config, tokenizer, quantization, values and
manifest. No model code runs (no forward pass, never remote code); the expected-tensor check builds the
architecture's parameter list on the ``meta`` device with transformers' own class for ``model_type``.

Each check records a :class:`~adaptkit.verify.findings.CheckRecord`; every broken rule is a
:class:`~adaptkit.verify.findings.Finding` whose message names the file. The rules are listed in
specs/verify.md (section "Static checks").
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable

from adaptkit.errors import CheckpointError
from adaptkit.io.checkpoint import INDEX_NAME, SINGLE_NAME, resolve_inside
from adaptkit.io.manifest import MANIFEST_NAME, compute_manifest
from adaptkit.io.safetensors import SafetensorsFile, TensorInfo, _DuplicateKey, load_json_strict
from adaptkit.verify.findings import WARNING, Findings

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib")
TOKENIZER_SETS = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"), ("vocab.txt",))
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
FLOAT_CODES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
EMBED_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "tok_embeddings.weight")
HEAD_NAMES = ("lm_head.weight", "embed_out.weight", "output.weight")
LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")

#: foundation-reader messages -> rule ids (the reader's message already says what is wrong)
_HEADER_RULES = (
    ("duplicate key", "duplicate-key"),
    ("unknown dtype", "unknown-dtype"),
    ("overlaps", "overlapping-offsets"),
    ("header length", "header-length"),
    ("truncated", "truncated"),
    ("past the end", "truncated"),
    ("gap of", "gap"),
    ("trailing bytes", "trailing-bytes"),
    ("byte count", "byte-count"),
    ("not valid JSON", "header-json"),
    ("UTF-8", "header-utf8"),
)


def _header_rule(message: str) -> str:
    for needle, rule in _HEADER_RULES:
        if needle in message:
            return rule
    return "header-invalid"


def _read_strict_json(path: Path, findings: Findings, what: str) -> Any:
    try:
        return load_json_strict(path.read_bytes())
    except _DuplicateKey as e:
        findings.add("duplicate-key", path, f"{path}: {what} has the key {e.args[0]!r} twice (a reader keeps one "
                     "of them silently)")
    except (ValueError, UnicodeDecodeError) as e:
        findings.add("json", path, f"{path}: {what} is not valid JSON ({str(e).splitlines()[0]})")
    except OSError as e:
        findings.add("unreadable", path, f"{path}: cannot read {what} ({e.strerror})")
    return None


def _is_pickle_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return False
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return True  # a raw pickle stream (protocol 2-5)
    if head == b"PK\x03\x04":  # torch.save zip archive: look for its data.pkl
        import zipfile

        try:
            with zipfile.ZipFile(path) as zf:
                return any(n.endswith("data.pkl") for n in zf.namelist())
        except (zipfile.BadZipFile, OSError):
            return False
    return False



def _integer_grid_format(qc: dict) -> Any:
    """The core format module (:data:`adaptkit.formats.FORMATS`) whose ``quantization_config`` this is, when
    its packed integer layout can be checked from tensor headers (it provides ``static_layout``), else None."""
    from adaptkit.formats import FORMATS, format_module

    for name in FORMATS:
        mod = format_module(name)
        if hasattr(mod, "static_layout") and mod.detect_config(qc):
            return mod
    return None

class StaticChecker:
    """Runs the static checks on one checkpoint (see the module docstring)."""

    def __init__(self, path: Path, *, host: Any, findings: Findings | None = None,
                 progress: Callable[[int, int, str], None] | None = None) -> None:
        self.path = Path(path)
        self.folder = self.path if self.path.is_dir() else self.path.parent
        self.host = host
        self.f = findings or Findings()
        self.progress = progress
        self.files: dict[str, SafetensorsFile] = {}  # relative name -> opened shard (valid headers only)
        self.bad_shards: set[str] = set()
        self.referenced: list[str] = []  # shard names the checkpoint is made of
        self.config: dict[str, Any] | None = None
        self.infos: dict[str, TensorInfo] = {}  # logical tensors (dequantized view for quantized checkpoints)
        self.raw_infos: dict[str, TensorInfo] = {}  # stored tensors of the referenced shards
        self.quantized = False

    # -- helpers ---------------------------------------------------------------------------------
    def rel(self, p: Path | str) -> str:
        try:
            return Path(p).relative_to(self.folder).as_posix()
        except ValueError:
            return str(p)

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.files.clear()

    # -- entry -----------------------------------------------------------------------------------
    def run(self, *, manifest: str | None = None, scan_values: bool = True) -> Findings:
        try:
            self.check_files()
            if self.path.is_file() and self.path.suffix == ".gguf":
                self.check_gguf(scan_values)
            else:
                self.check_headers()
                self.check_index()
                self.check_config()
                self.check_tokenizer()
                self.check_quantization()
                self.check_expected_tensors()
                if scan_values:
                    self.check_finite()
                else:
                    self.f.skip("finite", "not asked (--no-scan)")
            self.check_manifest(manifest)
        finally:
            self.close()
        return self.f

    # -- 1. files and the format policy -------------------------------------------------------------
    def check_files(self) -> None:
        self.f.start("format-policy", "no pickle files; safetensors or GGUF weights")
        if self.path.is_file():
            candidates = [self.path]
        else:
            candidates = []
            for dirpath, dirnames, filenames in os.walk(self.folder):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                candidates += [Path(dirpath) / n for n in sorted(filenames) if not n.startswith(".")]
        for p in candidates:
            if p.suffix in (".safetensors", ".json", ".jinja", ".md", ".txt", ".gguf", ".model", ".yaml", ".yml"):
                continue
            if p.suffix in PICKLE_SUFFIXES or (p.is_file() and _is_pickle_magic(p)):
                self.f.add("pickle-refused", p, f"{p}: pickle file present (pickle can run code when loaded; "
                           "only safetensors or GGUF weights are accepted)")
            elif p.suffix == ".py":
                self.f.add("python-code", p, f"{p}: Python file in the checkpoint (custom model code is never run "
                           "by adaptkit; transformers needs trust_remote_code for it)", severity=WARNING)
        if self.path.is_dir():
            sts = [p for p in self.folder.glob("*.safetensors") if not p.name.startswith(".")]
            if not sts and not (self.folder / INDEX_NAME).exists() and not any(self.folder.glob("*.gguf")):
                raise CheckpointError(f"{self.folder}: no model files (no *.safetensors, no {INDEX_NAME}, no *.gguf)"
                                      + ("; only pickle weights, which are refused" if self.f.errors else ""))

    # -- 2. safetensors headers ----------------------------------------------------------------------
    def check_headers(self) -> None:
        self.f.start("safetensors-header", "every header valid (the foundation reader's rules)")
        paths = [self.path] if self.path.is_file() else sorted(
            p for p in self.folder.glob("*.safetensors") if not p.name.startswith("."))
        for p in paths:
            try:
                sf = SafetensorsFile(p)
            except CheckpointError as e:
                self.bad_shards.add(self.rel(p))
                self.f.add(_header_rule(e.message), p, e.message)
                continue
            self.files[self.rel(p)] = sf
            meta = sf.metadata
            if meta is None or "format" not in meta:
                self.f.add("no-metadata", p, f"{p}: no __metadata__ 'format' entry (transformers 4.x refuses such "
                           "a file, 5.x loads it as PyTorch weights)", severity=WARNING)
            elif meta.get("format") not in ("pt", "torch"):
                self.f.add("metadata-format", p, f"{p}: __metadata__ format is {meta.get('format')!r}, not 'pt' "
                           "(written for another framework)", severity=WARNING)

    # -- 3. index <-> shards ------------------------------------------------------------------------
    def check_index(self) -> None:
        if self.path.is_file():
            self.f.skip("index", "single file")
            self.referenced = [self.rel(self.path)]
            self._collect_raw()
            return
        index = self.folder / INDEX_NAME
        others = sorted(p for p in self.folder.glob("*.safetensors.index.json"))
        on_disk = sorted(self.rel(p) for p in self.folder.glob("*.safetensors") if not p.name.startswith("."))
        rec = self.f.start("index", "every tensor mapped once, no stale or unreferenced shard, total_size right")
        if not index.exists():
            if len(others) == 1:
                index = others[0]
            elif others:
                self.f.add("several-indexes", self.folder, f"{self.folder}: several index files "
                           f"({', '.join(p.name for p in others)}) and no {INDEX_NAME}")
                return
        if not index.exists():
            if SINGLE_NAME in on_disk:
                self.referenced = [SINGLE_NAME]
                rec.detail = f"single file {SINGLE_NAME}"
                for name in on_disk:
                    if name != SINGLE_NAME:
                        self.f.add("unreferenced-shard", self.folder / name,
                                   f"{self.folder / name}: shard not referenced by anything (transformers loads "
                                   f"{SINGLE_NAME} only; a stale or unreferenced shard)")
            elif len(on_disk) == 1:
                self.referenced = on_disk
                self.f.add("nonstandard-name", self.folder / on_disk[0], f"{self.folder / on_disk[0]}: the only "
                           f"weights file is not named {SINGLE_NAME} (transformers will not find it)", severity=WARNING)
            elif on_disk:
                self.f.add("no-index", self.folder, f"{self.folder}: {len(on_disk)} safetensors shards and no "
                           f"{INDEX_NAME} (transformers cannot tell which tensors belong to the model)")
                self.referenced = on_disk
            self._collect_raw()
            return
        doc = _read_strict_json(index, self.f, "the index")
        if doc is None:
            return
        if not isinstance(doc, dict) or not isinstance(doc.get("weight_map"), dict):
            self.f.add("weight-map", index, f"{index}: no 'weight_map' object of tensor name -> shard file")
            return
        wm: dict[str, Any] = doc["weight_map"]
        shards: dict[str, str] = {}  # as written -> canonical relative name
        for name, rel in wm.items():
            if rel in shards or (isinstance(rel, str) and rel in self.bad_shards):
                continue
            try:
                p = resolve_inside(self.folder, rel, f"{index}: tensor {name!r}")
            except CheckpointError as e:
                rule = ("path-outside-folder" if ("outside" in e.message or "'..'" in e.message
                                                  or "absolute" in e.message) else "missing-shard")
                self.f.add(rule, index, e.message)
                shards[rel] = ""
                continue
            shards[rel] = self.rel(p)
        self.referenced = sorted({c for c in shards.values() if c})
        for rel in on_disk:
            if rel not in self.referenced and rel not in shards:
                self.f.add("unreferenced-shard", self.folder / rel, f"{self.folder / rel}: shard not referenced by "
                           f"{index.name} (a stale or unreferenced shard; transformers ignores it)")
        owner: dict[str, str] = {}
        for rel in self.referenced:
            sf = self.files.get(rel)
            if sf is None:
                continue
            for tname in sf.infos:
                if tname in owner:
                    self.f.add("duplicate-tensor", self.folder / rel, f"{self.folder / rel}: tensor {tname!r} is "
                               f"also stored in {owner[tname]} (one of them is silently ignored)")
                owner[tname] = rel
                if tname not in wm:
                    self.f.add("unlisted-tensor", self.folder / rel, f"{self.folder / rel}: tensor {tname!r} is not "
                               f"listed in {index.name} (transformers never loads it)")
        for tname, rel in wm.items():
            canon = shards.get(rel) if isinstance(rel, str) else None
            if not canon or canon not in self.files:
                continue
            if tname not in self.files[canon].infos:
                self.f.add("tensor-not-in-shard", index, f"{index}: tensor {tname!r} is mapped to {rel!r}, which does "
                           "not contain it (a stale index or shard)")
        self._collect_raw()
        meta = doc.get("metadata")
        total = meta.get("total_size") if isinstance(meta, dict) else None
        actual = sum(i.nbytes for i in self.raw_infos.values())
        if total is None:
            self.f.add("total-size-missing", index, f"{index}: metadata.total_size is missing", severity=WARNING)
        elif isinstance(total, bool) or not isinstance(total, (int, float)) or int(total) != actual:
            if not self.bad_shards:
                self.f.add("total-size", index, f"{index}: metadata.total_size is {total!r} but the referenced "
                           f"shards hold {actual} bytes of tensors")
        rec.detail = f"{len(wm)} tensors in {len(self.referenced)} shard(s)"

    def _collect_raw(self) -> None:
        for rel in self.referenced:
            sf = self.files.get(rel)
            if sf is not None:
                for name, info in sf.infos.items():
                    self.raw_infos.setdefault(name, info)

    # -- 4. config <-> tensors -------------------------------------------------------------------------
    def check_config(self) -> None:
        cfg_path = self.folder / "config.json"
        self.f.start("config", "config.json agrees with the tensors (vocabulary rows, hidden size, tied "
                     "embeddings, layer count, token ids)")
        if not cfg_path.is_file():
            self.f.add("config-missing", cfg_path, f"{cfg_path}: missing (transformers needs it to build the model)")
            return
        cfg = _read_strict_json(cfg_path, self.f, "config.json")
        if cfg is None:
            return
        if not isinstance(cfg, dict):
            self.f.add("config-object", cfg_path, f"{cfg_path}: config.json is not a JSON object")
            return
        self.config = cfg
        self.quantized = isinstance(cfg.get("quantization_config"), dict)
        self.infos = self._logical_infos() if not self.bad_shards else {}
        text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
        vocab = text.get("vocab_size")
        hidden = text.get("hidden_size") or text.get("n_embd") or text.get("d_model")
        n_layers = text.get("num_hidden_layers") or text.get("n_layer") or text.get("num_layers")
        infos = self.infos
        if not infos:
            return
        embed = next((n for n in infos if n.endswith(EMBED_SUFFIXES)), None)
        head = next((n for n in HEAD_NAMES if n in infos), None)
        where = lambda n: self._file_of(n)  # noqa: E731
        if isinstance(vocab, int) and embed is not None:
            rows = infos[embed].shape[0] if infos[embed].shape else None
            if rows != vocab:
                self.f.add("vocab-rows", where(embed), f"{where(embed)}: {embed} has {rows} rows but config.json "
                           f"vocab_size is {vocab} (one embedding row per token id)")
            if head is not None and infos[head].shape and infos[head].shape[0] != vocab:
                self.f.add("vocab-rows", where(head), f"{where(head)}: {head} has {infos[head].shape[0]} rows but "
                           f"config.json vocab_size is {vocab}")
        if isinstance(hidden, int) and embed is not None and len(infos[embed].shape) == 2:
            if infos[embed].shape[1] != hidden:
                self.f.add("hidden-size", where(embed), f"{where(embed)}: {embed} has {infos[embed].shape[1]} "
                           f"columns but config.json hidden_size is {hidden}")
        tied = self._tied(cfg, text)
        if tied is False and head is None and embed is not None:
            self.f.add("untied-head-missing", cfg_path, f"{cfg_path}: tie_word_embeddings is false but no lm_head "
                       "tensor is stored (transformers would initialise the output layer randomly)")
        if tied and head is not None and embed is not None and infos[head].shape == infos[embed].shape:
            if self.raw_infos.get(head) is not None and self.raw_infos.get(embed) is not None and not self.quantized:
                a, b = self._get(head), self._get(embed)
                if a is not None and b is not None and not bool((a == b).all()):
                    self.f.add("tied-head-differs", where(head), f"{where(head)}: {head} differs from {embed} but "
                               "tie_word_embeddings is true (transformers ties them and drops the stored head)",
                               severity=WARNING)
        if isinstance(n_layers, int):
            seen = sorted({int(m.group(1)) for n in infos for m in [LAYER_RE.search(n)] if m})
            if seen and seen != list(range(n_layers)):
                missing = sorted(set(range(n_layers)) - set(seen))
                extra = sorted(set(seen) - set(range(n_layers)))
                what = (f"layers {missing[:5]} have no tensors" if missing else
                        f"tensors exist for layers {extra[:5]} beyond it")
                self.f.add("layer-count", cfg_path, f"{cfg_path}: num_hidden_layers is {n_layers} but {what}")
        vocab_limit = vocab if isinstance(vocab, int) else None
        if vocab_limit is not None:
            gen = self.folder / "generation_config.json"
            sources: list[tuple[Path, dict]] = [(cfg_path, text)]
            if gen.is_file():
                g = _read_strict_json(gen, self.f, "generation_config.json")
                if isinstance(g, dict):
                    sources.append((gen, g))
            for src, doc in sources:
                for key in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
                    ids = doc.get(key)
                    for tid in ids if isinstance(ids, list) else [ids]:
                        if tid is None:
                            continue
                        if isinstance(tid, bool) or not isinstance(tid, int) or not 0 <= tid < vocab_limit:
                            self.f.add("token-id-range", src, f"{src}: {key} {tid!r} is outside the vocabulary "
                                       f"(0..{vocab_limit - 1})")

    def _tied(self, cfg: dict, text: dict) -> bool | None:
        for doc in (text, cfg):
            if isinstance(doc.get("tie_word_embeddings"), bool):
                return doc["tie_word_embeddings"]
        try:
            from transformers import AutoConfig

            return bool(AutoConfig.for_model(str(cfg.get("model_type"))).tie_word_embeddings)
        except Exception:  # noqa: BLE001 - unknown model_type: the default cannot be known
            return None

    def _logical_infos(self) -> dict[str, TensorInfo]:
        if not self.quantized:
            return dict(self.raw_infos)
        if self.bad_shards:
            return {}
        try:
            ckpt = self.host.open_model(self.folder)
        except CheckpointError as e:
            self.f.add("quantized-layout", self.folder, e.message, check="quantization")
            return {}
        try:
            return {n: ckpt.info(n) for n in ckpt.names()}
        finally:
            ckpt.close()

    def _file_of(self, name: str) -> Path:
        info = self.raw_infos.get(name) or self.infos.get(name)
        return Path(info.file) if info is not None else self.folder

    def _get(self, name: str) -> Any:
        info = self.raw_infos.get(name)
        if info is None:
            return None
        sf = self.files.get(self.rel(info.file))
        return sf.get(name) if sf is not None else None

    # -- 5. tokenizer -------------------------------------------------------------------------------
    def check_tokenizer(self) -> None:
        self.f.start("tokenizer", "tokenizer files and chat template present, token ids inside the vocabulary")
        present = [s for s in TOKENIZER_SETS if all((self.folder / n).is_file() for n in s)]
        if not present:
            self.f.add("tokenizer-missing", self.folder, f"{self.folder}: no tokenizer files (tokenizer.json, "
                       "tokenizer.model, vocab.json+merges.txt or vocab.txt)")
        tc_path = self.folder / "tokenizer_config.json"
        tc = None
        if tc_path.is_file():
            tc = _read_strict_json(tc_path, self.f, "tokenizer_config.json")
        elif present:
            self.f.add("tokenizer-config-missing", tc_path, f"{tc_path}: missing (special tokens and the tokenizer "
                       "class come from it)", severity=WARNING)
        has_template = any((self.folder / n).is_file() for n in CHAT_TEMPLATE_FILES) or (
            isinstance(tc, dict) and bool(tc.get("chat_template")))
        if not has_template:
            self.f.add("chat-template-missing", self.folder, f"{self.folder}: no chat template (chat_template.jinja, "
                       "chat_template.json or tokenizer_config.json chat_template); chat use will fail",
                       severity=WARNING)
        tj = self.folder / "tokenizer.json"
        if not tj.is_file():
            return
        doc = _read_strict_json(tj, self.f, "tokenizer.json")
        if not isinstance(doc, dict):
            return
        vocab_size = None
        if self.config is not None:
            text = self.config.get("text_config") if isinstance(self.config.get("text_config"), dict) else self.config
            vocab_size = text.get("vocab_size") if isinstance(text.get("vocab_size"), int) else None
        ids: list[tuple[int, str]] = []
        model = doc.get("model") if isinstance(doc.get("model"), dict) else {}
        vocab = model.get("vocab")
        if isinstance(vocab, dict):
            ids += [(v, k) for k, v in vocab.items() if isinstance(v, int)]
        elif isinstance(vocab, list):  # unigram: [[piece, score], ...], ids are positions
            ids += [(len(vocab) - 1, "(last piece)")] if vocab else []
        for tok in doc.get("added_tokens") or []:
            if isinstance(tok, dict) and isinstance(tok.get("id"), int):
                ids.append((tok["id"], str(tok.get("content"))))
        if vocab_size is not None and ids:
            top, content = max(ids)
            if top >= vocab_size:
                self.f.add("token-id-range", tj, f"{tj}: token id {top} ({content!r}) is outside the model's "
                           f"vocabulary (config.json vocab_size {vocab_size})")

    # -- 6. quantization_config <-> tensors ---------------------------------------------------------------
    def check_quantization(self) -> None:
        qnames = [n for n in self.raw_infos if n.endswith((".qweight", ".quant_state.bitsandbytes__nf4",
                                                           ".quant_state.bitsandbytes__fp4", ".SCB"))]
        if self.config is None:
            self.f.skip("quantization", "no config.json")
            return
        qc = self.config.get("quantization_config")
        if qc is None:
            if qnames:
                self.f.start("quantization", "")
                self.f.add("config-missing", self.folder / "config.json", f"{self.folder / 'config.json'}: no "
                           f"quantization_config but the tensors are quantized ({qnames[0]})")
            else:
                self.f.skip("quantization", "not a quantized checkpoint")
            return
        rec = next((r for r in self.f.records if r.name == "quantization"), None) or self.f.start("quantization")
        self.f._current = rec
        cfgp = self.folder / "config.json"
        if not isinstance(qc, dict):
            self.f.add("config-object", cfgp, f"{cfgp}: quantization_config is not an object")
            return
        method = str(qc.get("quant_method", "")).lower()
        rec.detail = f"quant_method {method or '?'}"
        fmt = _integer_grid_format(qc)
        if fmt is not None:
            self._check_integer_grid(fmt, method, qc, cfgp)
        elif method == "bitsandbytes":
            self._check_bnb(qc, cfgp)
        else:
            self.f.add("method-unchecked", cfgp, f"{cfgp}: quant_method {method!r} is not one adaptkit checks "
                       "(gptq, awq, bitsandbytes)", severity=WARNING)

    def _check_integer_grid(self, fmt: Any, method: str, qc: dict, cfgp: Path) -> None:
        bits, group = qc.get("bits", qc.get("w_bit")), qc.get("group_size", qc.get("q_group_size"))
        allowed = fmt.SUPPORTED_BITS
        if bits not in allowed:
            self.f.add("bits", cfgp, f"{cfgp}: quantization_config bits is {bits!r} (a {method} checkpoint has "
                       f"{'/'.join(map(str, allowed))})")
            return
        if isinstance(group, bool) or not isinstance(group, int) or not (group == -1 or group > 0):
            self.f.add("group-size", cfgp, f"{cfgp}: quantization_config group_size is {group!r} (-1 or > 0)")
            return
        infos = self.raw_infos
        mods = [n[: -len(".qweight")] for n in infos if n.endswith(".qweight")]
        if not mods:
            self.f.add("no-quantized-tensors", cfgp, f"{cfgp}: quantization_config says {method} but no tensor is "
                       "quantized (no *.qweight)")
            return
        for m in mods:
            qw = infos[m + ".qweight"]
            file = qw.file
            if qw.dtype != "I32" or len(qw.shape) != 2:
                self.f.add("qweight", file, f"{file}: {m}.qweight must be a 2-D int32 tensor (is {qw.dtype} "
                           f"{list(qw.shape)})")
                continue
            _, _, want = fmt.static_layout(tuple(qw.shape), bits, group, has_g_idx=f"{m}.g_idx" in infos)
            for suffix, (dtypes, shape) in want.items():
                info = infos.get(f"{m}.{suffix}")
                if info is None:
                    self.f.add("missing-part", file, f"{file}: {m}.qweight has no {m}.{suffix}")
                elif info.dtype not in dtypes or tuple(info.shape) != tuple(shape):
                    self.f.add("shape", info.file, f"{info.file}: {m}.{suffix} is {info.dtype} {list(info.shape)}; "
                               f"bits {bits} and group_size {group} with {m}.qweight {list(qw.shape)} need "
                               f"{dtypes[0]} {list(shape)}")
            if f"{m}.weight" in infos:
                self.f.add("double-weight", file, f"{file}: {m} has both a quantized qweight and a float weight "
                           "(which one a loader uses is undefined)")

    def _check_bnb(self, qc: dict, cfgp: Path) -> None:
        infos = self.raw_infos
        if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
            if not any(n.endswith(".SCB") for n in infos):
                self.f.add("no-quantized-tensors", cfgp, f"{cfgp}: load_in_8bit but no *.SCB tensors")
            return
        states = [n for n in infos if ".quant_state.bitsandbytes__" in n]
        if not states:
            self.f.add("no-quantized-tensors", cfgp, f"{cfgp}: load_in_4bit but no *.quant_state.bitsandbytes__* "
                       "tensors")
            return
        qtype = str(qc.get("bnb_4bit_quant_type", "fp4"))
        for n in states:
            w, _, kind = n.partition(".quant_state.bitsandbytes__")
            file = infos[n].file
            if kind != qtype:
                self.f.add("quant-type", file, f"{file}: {n} is {kind} but config.json bnb_4bit_quant_type is {qtype!r}")
            try:
                raw = self._get(n)
                state = json.loads(bytes(raw.tolist()).decode("utf-8"))
                shape = tuple(int(x) for x in state["shape"])
                block = int(state.get("blocksize", 64))
            except Exception as e:  # noqa: BLE001 - any malformed state is the same finding
                self.f.add("quant-state", file, f"{file}: {n} is not a valid quant_state ({type(e).__name__})")
                continue
            numel = math.prod(shape)
            wi, ai = infos.get(w), infos.get(f"{w}.absmax")
            if wi is None or ai is None:
                self.f.add("missing-part", file, f"{file}: {n} without {w} or {w}.absmax")
                continue
            if wi.nbytes * 2 < numel:  # two 4-bit values per byte
                self.f.add("shape", wi.file, f"{wi.file}: {w} holds {wi.nbytes * 2} 4-bit values but its "
                           f"quant_state shape {list(shape)} needs {numel}")
            nested = f"{w}.nested_absmax" in infos
            blocks = math.ceil(numel / block)
            if not nested and ai.numel != blocks:
                self.f.add("shape", ai.file, f"{ai.file}: {w}.absmax has {ai.numel} values; {numel} weights in "
                           f"blocks of {block} need {blocks}")

    # -- 7. expected tensors (architecture on the meta device) ---------------------------------------------
    def check_expected_tensors(self) -> None:
        if self.config is None or not self.infos or self.bad_shards:
            self.f.skip("expected-tensors", "a shard's header is invalid" if self.bad_shards
                        else "no config.json or no readable tensors")
            return
        rec = self.f.start("expected-tensors", "every tensor the architecture needs is stored, and nothing else")
        try:
            expected, optional = expected_tensor_names(self.config)
        except Exception as e:  # noqa: BLE001 - an architecture transformers does not know: reported, not fatal
            rec.status = "skipped"
            rec.detail = f"architecture not built ({type(e).__name__}: {' '.join(str(e).split())[:160]})"
            return
        have = set(self.infos)
        idx = self.folder / INDEX_NAME
        for name in sorted(expected - have - optional):
            file = idx if idx.is_file() else self._sibling_file(name)
            self.f.add("missing-tensor", file, f"{file}: tensor {name!r} is missing (transformers would initialise "
                       "it randomly and load without an error)")
        for name in sorted(have - expected):
            self.f.add("unexpected-tensor", self._file_of(name), f"{self._file_of(name)}: tensor {name!r} is not part "
                       f"of the {self.config.get('model_type')} architecture (transformers would ignore it)")
        rec.detail = f"{len(expected)} expected, {len(have)} stored"

    def _sibling_file(self, name: str) -> Path:
        m = LAYER_RE.search(name)
        if m:  # the file holding the same tensor of another layer
            pattern = re.compile(re.escape(name[: m.start(1)]) + r"\d+" + re.escape(name[m.end(1):]))
            for other, info in self.raw_infos.items():
                if pattern.fullmatch(other):
                    return Path(info.file)
        if self.referenced:
            return self.folder / self.referenced[0]
        return self.folder

    # -- 8. values -----------------------------------------------------------------------------------
    def check_finite(self) -> None:
        rec = self.f.start("finite", "no NaN or Inf in any stored floating-point tensor")
        names = [n for n, i in self.raw_infos.items() if i.dtype in FLOAT_CODES]
        total = sum(self.raw_infos[n].nbytes for n in names)
        done = 0
        bad = 0
        for n in names:
            info = self.raw_infos[n]
            t = self._get(n)
            if t is None:
                continue
            nan, inf = count_nonfinite(t)
            if nan or inf:
                bad += 1
                if bad <= 20:
                    self.f.add("non-finite", info.file, f"{info.file}: tensor {n!r} has {nan} NaN and {inf} Inf "
                               "values")
            done += info.nbytes
            if self.progress is not None:
                self.progress(done, total, "scanning values")
        if bad > 20:
            self.f.add("non-finite", self.folder, f"{self.folder}: {bad - 20} more tensors with NaN/Inf values")
        rec.detail = f"{len(names)} floating-point tensors scanned"

    # -- GGUF --------------------------------------------------------------------------------------------
    def check_gguf(self, scan_values: bool) -> None:
        rec = self.f.start("gguf", "the GGUF loader reads every tensor")
        try:
            ckpt = self.host.open_model(self.path)
        except CheckpointError as e:
            self.f.add("gguf-invalid", self.path, e.message)
            return
        try:
            names = ckpt.names()
            rec.detail = f"{len(names)} tensors ({getattr(ckpt, 'source_format', None) or 'float'})"
            if not scan_values:
                return
            self.f.start("finite", "no NaN or Inf in any tensor (dequantized)")
            for i, n in enumerate(names):
                nan, inf = count_nonfinite(ckpt.get(n))
                if nan or inf:
                    self.f.add("non-finite", self.path, f"{self.path}: tensor {n!r} has {nan} NaN and {inf} Inf values")
                if self.progress is not None:
                    self.progress(i + 1, len(names), "scanning values")
        finally:
            ckpt.close()
        for name in ("safetensors-header", "index", "config", "tokenizer", "quantization", "expected-tensors"):
            self.f.skip(name, "GGUF file (its header, tokenizer and config are checked by the GGUF loader)")

    # -- 9. manifest ---------------------------------------------------------------------------------------
    def check_manifest(self, mode: str | None) -> None:
        mpath = self.folder / MANIFEST_NAME
        if mode == "write":
            self.f.skip("manifest", "written after the checks pass (--manifest write)")
            return
        if mode is None and not mpath.exists():
            self.f.skip("manifest", f"no {MANIFEST_NAME} (write one with --manifest write)")
            return
        rec = self.f.start("manifest", f"every file matches its sha256 in {MANIFEST_NAME}")
        if not mpath.is_file():
            self.f.add("manifest-missing", mpath, f"{mpath}: missing (--manifest check needs it)")
            return
        doc = _read_strict_json(mpath, self.f, MANIFEST_NAME)
        if doc is None:
            return
        files = doc.get("files") if isinstance(doc, dict) else None
        if not isinstance(files, dict) or doc.get("algorithm", "sha256") != "sha256":
            self.f.add("manifest-format", mpath, f"{mpath}: expected {{'algorithm': 'sha256', 'files': {{...}}}}")
            return
        actual = compute_manifest(self.folder)["files"]
        for name, want in sorted(files.items()):
            p = self.folder / name
            if name not in actual:
                self.f.add("file-missing", p, f"{p}: listed in {MANIFEST_NAME} but missing")
            elif not isinstance(want, dict) or actual[name]["sha256"] != want.get("sha256"):
                self.f.add("hash-mismatch", p, f"{p}: sha256 differs from the one recorded in {MANIFEST_NAME} "
                           "(the file changed after the manifest was written)")
            elif actual[name]["size"] != want.get("size"):
                self.f.add("size-mismatch", p, f"{p}: size differs from {MANIFEST_NAME}")
        for name in sorted(set(actual) - set(files)):
            self.f.add("file-unlisted", self.folder / name, f"{self.folder / name}: not listed in {MANIFEST_NAME} "
                       "(added after the manifest was written)")
        rec.detail = f"{len(files)} files"


def count_nonfinite(t: Any, chunk: int = 1 << 24) -> tuple[int, int]:
    """(NaN count, Inf count) of a tensor, scanned in chunks (no full-size temporaries)."""
    import torch

    flat = t.reshape(-1)
    if flat.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        flat = flat.to(torch.float16)
    nan = inf = 0
    for s in range(0, flat.numel(), chunk):
        c = flat[s : s + chunk]
        if bool(torch.isfinite(c).all()):
            continue
        nan += int(torch.isnan(c).sum())
        inf += int(torch.isinf(c).sum())
    return nan, inf


def expected_tensor_names(config: dict[str, Any]) -> tuple[set[str], set[str]]:
    """(state-dict names of the causal-LM architecture for ``config``, names allowed to be absent: tied
    weights and the class's ``_keys_to_ignore_on_load_missing``), built on the meta device."""
    import torch
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    cfg = {k: v for k, v in config.items() if k not in ("quantization_config",)}
    model_type = cfg.pop("model_type")
    conf = AutoConfig.for_model(model_type, **cfg)
    cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(conf)]
    from adaptkit.verify.load import quiet_transformers

    with quiet_transformers(), torch.device("meta"):
        model = cls(conf)
    names = set(model.state_dict().keys())
    optional: set[str] = set()
    tied = getattr(model, "all_tied_weights_keys", None)
    if isinstance(tied, dict):
        optional |= set(tied)
    elif getattr(conf, "tie_word_embeddings", False):
        optional |= {"lm_head.weight"}
    for pattern in getattr(model, "_keys_to_ignore_on_load_missing", None) or ():
        optional |= {n for n in names if re.search(pattern, n)}
    return names, optional
