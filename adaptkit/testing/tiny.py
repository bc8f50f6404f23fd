"""Tiny, deterministic Llama checkpoints for tests: random weights, a real (offline-trained) tokenizer.

``make_tiny_llama(path)`` writes a complete Hugging Face folder (``config.json``, ``generation_config.json``,
``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja``) that
``AutoModelForCausalLM`` / ``AutoTokenizer`` load with no network. ``perturbed_copy(src, dst)`` derives a
fine-tune-like variant (base + small relative noise), so merge tests can build a base and several variants.

The tokenizer is a byte-level BPE trained in-process (~0.2 s, cached per process) on the topic texts that
CPython ships in ``pydoc_data/topics.py`` (a fixed built-in text when that module is absent). Byte-level
means every string round-trips exactly. Its token ids may differ between Python versions (different
training text); tests should not hard-code ids.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adaptkit.errors import CheckpointError, ConfigError
from adaptkit.io import atomic_output_dir, check_output_target

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["make_tiny_llama", "perturbed_copy", "tiny_tokenizer", "CHAT_TEMPLATE", "TOKENIZER_VOCAB_SIZE"]

TOKENIZER_VOCAB_SIZE = 512
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_FALLBACK_TEXT = """\
Beautiful is better than ugly. Explicit is better than implicit. Simple is better than complex.
Complex is better than complicated. Flat is better than nested. Sparse is better than dense.
Readability counts. Special cases aren't special enough to break the rules. Although practicality
beats purity. Errors should never pass silently. Unless explicitly silenced. In the face of ambiguity,
refuse the temptation to guess. There should be one-- and preferably only one --obvious way to do it.
Now is better than never. Although never is often better than *right* now. If the implementation is
hard to explain, it's a bad idea. If the implementation is easy to explain, it may be a good idea.
The quick brown fox jumps over the lazy dog. def main(argv): return 0 if argv else 1
The capital of France is Paris. A language model predicts the next token from the previous ones.
"""

_DTYPES = {
    "float32": "float32", "fp32": "float32", "f32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "f16": "float16", "half": "float16",
}


def _dtype_name(dtype: Any) -> str:
    name = str(dtype).removeprefix("torch.").lower()
    if name not in _DTYPES:
        raise ConfigError(f"dtype={dtype!r}: expected one of float32, bfloat16, float16 (or the torch dtype)")
    return _DTYPES[name]


def _training_texts() -> list[str]:
    try:
        from pydoc_data.topics import topics  # CPython's own help texts, ~460 kB of real English + code
    except ImportError:  # pragma: no cover - stripped Python builds
        return [_FALLBACK_TEXT] * 20
    return [topics[key] for key in sorted(topics)] + [_FALLBACK_TEXT]


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    """The trained byte-level BPE as tokenizer.json text (trained once per process, deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(_training_texts(), trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(*, model_max_length: int = 256):
    """A fresh ``PreTrainedTokenizerFast`` with bos/eos/pad/unk and a ChatML-style chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=model_max_length,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _save_tokenizer(tok, directory: Path) -> None:
    tok.save_pretrained(str(directory))
    # transformers 5 records its own class name; PreTrainedTokenizerFast loads in 4.x and 5.x alike.
    cfg_path = directory / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _seed_all_biases(model, seed: int, std: float) -> None:
    """Give bias vectors small random values (transformers initialises them to zero)."""
    import torch

    gen = torch.Generator().manual_seed(seed + 7919)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith(".bias"):
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def make_tiny_llama(
    path: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    vocab_size: int | None = None,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    attention_bias: bool = False,
    mlp_bias: bool = False,
    tie_word_embeddings: bool = False,
    dtype: "str | torch.dtype" = "float32",
    seed: int = 0,
    max_position_embeddings: int = 256,
) -> Path:
    """Write a randomly initialised ``LlamaForCausalLM`` (seeded) plus tokenizer to ``path``; return it.

    ``vocab_size`` defaults to the tokenizer's size (512); a larger value adds embedding rows no token uses.
    Biases (when enabled) get small random values so that code dropping them is caught. The same options
    and seed always give bit-identical weights. ``path`` must not exist or be an empty folder; the folder
    appears atomically (written beside it, then renamed).
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    target = Path(path)
    check_output_target(target)
    dtype_name = _dtype_name(dtype)
    if hidden_size % num_heads:
        raise ConfigError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
    if num_heads % num_kv_heads:
        raise ConfigError(f"num_heads={num_heads} is not divisible by num_kv_heads={num_kv_heads}")
    if (hidden_size // num_heads) % 2:
        raise ConfigError(f"head dim {hidden_size // num_heads} must be even (rotary embeddings)")

    tok = tiny_tokenizer(model_max_length=max_position_embeddings)
    n_tok = len(tok)
    if vocab_size is None:
        vocab_size = n_tok
    if vocab_size < n_tok:
        raise ConfigError(f"vocab_size={vocab_size} is smaller than the tokenizer's {n_tok} tokens")

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        attention_bias=attention_bias,
        mlp_bias=mlp_bias,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        rms_norm_eps=1e-6,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    _seed_all_biases(model, seed, config.initializer_range)
    model = model.to(getattr(torch, dtype_name)).eval()
    model.config.dtype = dtype_name
    model.config.architectures = ["LlamaForCausalLM"]
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )

    with atomic_output_dir(target) as tmp:
        kwargs = {}
        if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
            kwargs["safe_serialization"] = True  # transformers 4.x; 5.x writes safetensors only
        model.save_pretrained(str(tmp), **kwargs)
        _save_tokenizer(tok, tmp)
        if not (tmp / "model.safetensors").is_file():  # pragma: no cover - defensive
            raise CheckpointError(f"{target}: transformers did not write model.safetensors")
    return target


def _noise_seed(seed: int, name: str) -> int:
    h = hashlib.blake2b(f"{seed}\x00{name}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def perturbed_copy(src: str | Path, dst: str | Path, *, scale: float = 0.01, seed: int = 1) -> Path:
    """Copy the checkpoint folder ``src`` to ``dst`` with every float tensor nudged: a fine-tune-like variant.

    Each tensor ``w`` becomes ``w + scale * rms(w) * N(0, 1)`` (``rms(w)`` = root mean square of ``w``, or 1
    for an all-zero tensor), drawn from a generator seeded by ``(seed, tensor name)`` so the result does not
    depend on file order. Dtypes, shapes, names, shard layout and non-weight files (config, tokenizer,
    index) are kept. Different seeds give different variants of the same base.
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a checkpoint folder")
    shards = sorted(src.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"{src}: no *.safetensors file to perturb")
    check_output_target(dst)
    with atomic_output_dir(dst) as tmp:
        for item in sorted(src.iterdir()):
            if item.suffix == ".safetensors" or item.name.startswith("."):
                continue
            if item.is_file():
                shutil.copy2(item, tmp / item.name)
        for shard in shards:
            out: dict[str, torch.Tensor] = {}
            with safe_open(str(shard), framework="pt") as f:
                metadata = f.metadata()
                for name in f.keys():
                    w = f.get_tensor(name)
                    if w.is_floating_point():
                        w64 = w.to(torch.float64)
                        rms = float(w64.square().mean().sqrt()) if w.numel() else 0.0
                        gen = torch.Generator().manual_seed(_noise_seed(seed, name))
                        noise = torch.randn(w.shape, generator=gen, dtype=torch.float64)
                        w = (w64 + scale * (rms or 1.0) * noise).to(w.dtype)
                    out[name] = w.contiguous()
            save_file(out, str(tmp / shard.name), metadata=metadata or {"format": "pt"})
    return dst
