"""An independent float64 Llama forward pass written from the architecture description (RMSNorm, rotary
embeddings with the rotate-half convention, grouped-query causal attention, SwiGLU MLP), reading weights
straight from the safetensors files and hyper-parameters from config.json."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                out[name] = st.get_tensor(name).to(torch.float64)
    return out


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _lin(x: torch.Tensor, w: dict, prefix: str) -> torch.Tensor:
    y = x @ w[prefix + ".weight"].T
    b = w.get(prefix + ".bias")
    return y if b is None else y + b


def _rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """x: (heads, T, d). Pairs (i, i + d/2) rotate by angle pos * theta^(-2i/d)."""
    d = x.shape[-1]
    half = d // 2
    inv = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / d)
    ang = torch.arange(x.shape[1], dtype=torch.float64)[:, None] * inv[None, :]
    cos, sin = torch.cos(ang), torch.sin(ang)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def llama_logits(folder: Path, ids: list[int], *, use_rope: bool = True) -> torch.Tensor:
    cfg = json.loads((Path(folder) / "config.json").read_text())
    w = load_weights(folder)
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or cfg["hidden_size"] // nh
    eps = cfg["rms_norm_eps"]
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta") or cfg.get("rope_theta", 10000.0)
    T = len(ids)
    h = w["model.embed_tokens.weight"][torch.tensor(ids)]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        x = _rms(h, w[f"{p}.input_layernorm.weight"], eps)
        q = _lin(x, w, f"{p}.self_attn.q_proj").view(T, nh, hd).transpose(0, 1)
        k = _lin(x, w, f"{p}.self_attn.k_proj").view(T, nkv, hd).transpose(0, 1)
        v = _lin(x, w, f"{p}.self_attn.v_proj").view(T, nkv, hd).transpose(0, 1)
        if use_rope:
            q, k = _rope(q, theta), _rope(k, theta)
        heads = []
        for head in range(nh):
            kv = head // (nh // nkv)
            s = q[head] @ k[kv].T / math.sqrt(hd)
            s = s.masked_fill(~causal, float("-inf"))
            heads.append(torch.softmax(s, dim=-1) @ v[kv])
        h = h + _lin(torch.cat(heads, dim=-1), w, f"{p}.self_attn.o_proj")
        x = _rms(h, w[f"{p}.post_attention_layernorm.weight"], eps)
        gate = _lin(x, w, f"{p}.mlp.gate_proj")
        h = h + _lin(torch.nn.functional.silu(gate) * _lin(x, w, f"{p}.mlp.up_proj"), w, f"{p}.mlp.down_proj")
    h = _rms(h, w["model.norm.weight"], eps)
    head_w = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return h @ head_w.T
