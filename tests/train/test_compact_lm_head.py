"""``compact_lm_head``: TRL's fused LM head scoring only label-carrying positions on CPU gives the same loss and
gradients as scoring every position (TRL's own CPU path) and as a float64 cross-entropy over the full logits;
the gate TRL reads is restored afterwards; a recipe trains the same loss curve either way."""
from __future__ import annotations

import json

import pytest

from .conftest import read_log, run_recipe, write_jsonl, write_recipe

torch = pytest.importorskip("torch")
engine = pytest.importorskip("adaptkit_trl.engine")
tu = pytest.importorskip("trl.trainer.utils")


def _fused_model(base):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    tu.add_fused_lm_head(model)
    return model


def _loss_and_grads(model, ids, labels, *, compact: bool):
    model.zero_grad()
    with engine.compact_lm_head(compact) as active:
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
    assert active is compact
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), out.log_probs.detach(), grads


def test_compact_head_matches_every_position_and_a_float64_reference(tiny_llama) -> None:
    model = _fused_model(tiny_llama())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=g)
    labels = ids.clone()
    labels[0, :17] = -100  # prompt positions: no label (a completion-only batch)
    labels[1, :9] = -100
    labels[1, 20:] = -100

    loss_c, lp_c, grads_c = _loss_and_grads(model, ids, labels, compact=True)
    loss_f, lp_f, grads_f = _loss_and_grads(model, ids, labels, compact=False)

    # float64 reference from the plain forward's full logits (not TRL's kernel)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.double()[:, :-1]
    tgt = labels[:, 1:]
    mask = tgt != -100
    logp = torch.log_softmax(logits, dim=-1).gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    ref = -(logp[mask]).sum() / mask.sum()
    assert float(loss_c) == pytest.approx(float(ref), rel=1e-6)
    assert torch.allclose(lp_c.double()[mask], logp[mask], rtol=0, atol=1e-5)
    assert (lp_c[~mask] == 0).all()

    assert float(loss_c) == pytest.approx(float(loss_f), rel=1e-6)
    assert set(grads_c) == set(grads_f) and grads_c
    for name, gc in grads_c.items():
        gf = grads_f[name]
        assert torch.allclose(gc, gf, rtol=1e-4, atol=1e-6 * max(1.0, float(gf.abs().max()))), name


def test_the_gate_is_restored_even_after_an_error() -> None:
    before = tu._use_triton
    cpu = torch.device("cpu")
    assert before(cpu) is False  # TRL's own choice on CPU: every position
    with pytest.raises(RuntimeError):
        with engine.compact_lm_head(True):
            assert tu._use_triton(cpu) is True
            raise RuntimeError("boom")
    assert tu._use_triton is before
    with engine.compact_lm_head(False) as active:
        assert active is False and tu._use_triton is before


def test_recipe_trains_the_same_curve_with_and_without_it(train_host, tiny_llama, tmp_path) -> None:
    base = tiny_llama()
    rows = [{"prompt": [{"role": "user", "content": f"Spell the number {a} in digits, please, thanks."}],
             "completion": [{"role": "assistant", "content": str(a)}]} for a in range(40)]
    data = write_jsonl(tmp_path / "pc.jsonl", rows)
    logs, docs = {}, {}
    for flag in (True, False):
        recipe = write_recipe(tmp_path / f"r{flag}.yml", base=str(base), method="sft",
                              data={"train": str(data), "format": "prompt_completion"},
                              adapter={"kind": "lora", "r": 4},
                              training={"max_steps": 4, "batch_size": 4, "learning_rate": 1e-3, "max_seq_len": 64,
                                        "packing": True, "lr_scheduler": "constant", "compact_lm_head": flag}, seed=2)
        out = tmp_path / f"out-{flag}"
        run_recipe(train_host, recipe, out)
        logs[flag] = [e["loss"] for e in read_log(out) if "loss" in e]
        docs[flag] = json.loads((out / "adaptkit.json").read_text())
    assert len(logs[True]) == 4
    assert logs[True] == pytest.approx(logs[False], rel=1e-5)
    assert docs[True]["result"]["metrics"]["compact_lm_head"] == 1.0
    assert docs[False]["result"]["metrics"]["compact_lm_head"] == 0.0
