"""Adapter math: pure tensor functions, fp32 in and out (formulas: specs/adapters.md).

Orientation: ``W`` is the base tensor as stored. A LoRA delta is formed as ``scaling * B @ A`` (``[out, in]``
for a linear); it is transposed to the stored layout for ``fan_in_fan_out`` (GPT-2 ``Conv1D``) and always
for an embedding (``[num_embeddings, dim]``), exactly as PEFT's ``get_delta_weight`` does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch


def lora_delta(a: "torch.Tensor", b: "torch.Tensor", scaling: float, *, transpose: bool) -> "torch.Tensor":
    """``scaling * (B @ A)``, transposed when ``transpose`` (embedding, fan_in_fan_out)."""
    d = (b @ a) * scaling
    return d.T if transpose else d


def dora_merge(w_current: "torch.Tensor", w_unmerged: "torch.Tensor", delta: "torch.Tensor",
               magnitude: "torch.Tensor", *, norm_dim: int) -> "torch.Tensor":
    """DoRA (Liu et al. 2024): ``(m / ||W0 + dW||) * (W + dW)``. The norm is taken over ``norm_dim`` of the
    stored layout (the input features of each output feature; each embedding dimension over the vocabulary)
    and of the *unmerged* base ``W0`` plus this adapter's delta, as PEFT's forward computes it; ``W`` may
    already hold previously merged adapters."""
    import torch

    norm = torch.linalg.norm(w_unmerged + delta, dim=norm_dim)
    factor = magnitude / norm
    factor = factor.unsqueeze(norm_dim)  # broadcast along the reduced dimension
    return factor * (w_current + delta)


def ia3_scale(w: "torch.Tensor", vec: "torch.Tensor", *, transpose: bool) -> "torch.Tensor":
    """IA3: ``W * l`` with ``l`` ``[out, 1]`` (rows) or ``[1, in]`` (feedforward: columns), transposed for
    fan_in_fan_out."""
    return w * (vec.T if transpose else vec)


def relative_error(ref: "torch.Tensor", approx: "torch.Tensor") -> float:
    """``||ref - approx||_F / ||ref||_F`` in float64 (0 when both are zero)."""
    import torch

    r = ref.to(torch.float64)
    num = float(torch.linalg.vector_norm(r - approx.to(torch.float64)))
    den = float(torch.linalg.vector_norm(r))
    return num / den if den else (0.0 if num == 0 else float("inf"))


@dataclass
class Factors:
    """A rank-``rank`` factorisation ``M ~= B @ A`` (``B = U sqrt(S)``, ``A = sqrt(S) V^T``) and its quality."""

    a: "torch.Tensor"  #: [rank, n]
    b: "torch.Tensor"  #: [m, rank]
    rank: int
    energy: float  #: sum of the kept S_i^2 / ||M||_F^2 (1.0 for a zero matrix)
    rel_error: float  #: ||M - B A||_F / ||M||_F, measured
    sigma_max: float
    sigma_last: float  #: smallest kept singular value
    s: "torch.Tensor | None" = None  #: the kept singular values (fp32)

    def truncate(self, k: int, m: "torch.Tensor") -> "Factors":
        """The first ``k`` components, with energy and error measured against ``m`` again."""
        import torch

        if k >= self.rank or self.s is None:
            return self
        b, a, s = self.b[:, :k].contiguous(), self.a[:k].contiguous(), self.s[:k]
        total = float(torch.linalg.vector_norm(m.to(torch.float64)) ** 2)
        return Factors(a=a, b=b, rank=k, energy=min(1.0, float((s.double() ** 2).sum()) / total),
                       rel_error=relative_error(m, b @ a), sigma_max=self.sigma_max, sigma_last=float(s[-1]), s=s)

    def rank_for_energy(self, min_energy: float, m: "torch.Tensor") -> int:
        """Smallest rank whose kept energy reaches ``min_energy`` (at most ``rank``)."""
        import torch

        if self.s is None or self.rank == 0:
            return self.rank
        total = float(torch.linalg.vector_norm(m.to(torch.float64)) ** 2)
        cum = torch.cumsum(self.s.double() ** 2, 0) / total
        hit = (cum >= min_energy).nonzero()
        return int(hit[0]) + 1 if len(hit) else self.rank

    def report(self) -> dict[str, Any]:
        return {"rank": self.rank, "energy": self.energy, "rel_error": self.rel_error,
                "sigma_max": self.sigma_max, "sigma_last": self.sigma_last}


def low_rank_factor(m: "torch.Tensor", rank: int, *, exact: bool = False, oversample: int = 10, niter: int = 2,
                    seed: int = 0) -> Factors:
    """Truncated SVD of ``m`` (``[rows, cols]``, fp32) at ``rank`` (capped at ``min(rows, cols)``).

    Default: randomized SVD (Halko, Martinsson & Tropp 2011) through ``torch.svd_lowrank`` with ``rank +
    oversample`` probe vectors and ``niter`` power iterations, its random probes drawn from a generator seeded
    by ``seed`` (the result does not depend on anything else). ``exact``: ``torch.linalg.svd``.
    Energy and error are computed in float64 against ``m`` itself.
    """
    import torch

    rows, cols = m.shape
    k = max(0, min(int(rank), rows, cols))
    m64sq = float(torch.linalg.vector_norm(m.to(torch.float64)) ** 2)
    if k == 0 or m64sq == 0.0:
        z = m.new_zeros
        return Factors(a=z((k, cols)), b=z((rows, k)), rank=k, energy=1.0, rel_error=0.0, sigma_max=0.0,
                       sigma_last=0.0, s=z((k,)))
    if exact or k + oversample >= min(rows, cols):
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        u, s, v = u[:, :k], s[:k], vh[:k].T
    else:
        q = min(k + int(oversample), rows, cols)
        with torch.random.fork_rng(devices=[m.device] if m.device.type == "cuda" else []):
            torch.manual_seed(int(seed) & ((1 << 63) - 1))
            u, s, v = torch.svd_lowrank(m, q=q, niter=int(niter))
        u, s, v = u[:, :k], s[:k], v[:, :k]
    root = s.clamp(min=0).sqrt()
    b = (u * root).contiguous()
    a = (root[:, None] * v.T).contiguous()
    kept = float((s.to(torch.float64) ** 2).sum())
    return Factors(a=a, b=b, rank=k, energy=min(1.0, kept / m64sq), rel_error=relative_error(m, b @ a),
                   sigma_max=float(s[0]), sigma_last=float(s[-1]), s=s)
