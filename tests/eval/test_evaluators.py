"""The four evaluators through the evaluate runner, each against an independent reference: lm-eval's HFLM for
bits per byte, direct float64 computations for agreement and multiple choice, hand-written verdicts for probes."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from adaptkit.errors import ConfigError  # noqa: E402
from adaptkit.evaluate.api import EvalRequest, TaskSpec  # noqa: E402
from adaptkit.evaluate.runner import run_eval  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_models():
    from adaptkit_eval import modeling

    modeling.clear()
    yield
    modeling.clear()


def _run(host, model, evaluator, tasks=(), **kw):
    req = EvalRequest(model=Path(model), evaluator=evaluator, tasks=tuple(TaskSpec(t) if isinstance(t, str) else t
                                                                          for t in tasks), **kw)
    return run_eval(req, host=host)


def test_bits_per_byte_equals_lm_eval_hflm(tiny_llama, adaptkit_pm):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adaptkit_eval import catalog

    m = tiny_llama()
    res = _run(adaptkit_pm, m, "perplexity", ["flores_eng"], limit=20, options={"max_length": 16})
    bpb = res.metric("bits_per_byte", "flores_eng")
    texts = catalog.text_documents(catalog.resolve("perplexity", "flores_eng"), 20)
    model = AutoModelForCausalLM.from_pretrained(str(m), dtype=torch.float32).eval()
    lm = HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(str(m)), batch_size=4, max_length=16)
    ll = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)],
                                  disable_tqdm=True)
    nbytes = sum(len(t.encode()) for t in texts)
    assert bpb.n == nbytes
    assert abs(bpb.value - (-sum(ll) / nbytes / math.log(2))) < 1e-5
    ntok = sum(len(AutoTokenizer.from_pretrained(str(m))(t, add_special_tokens=False)["input_ids"]) for t in texts)
    assert math.isclose(res.metric("token_perplexity", "flores_eng").value, math.exp(-sum(ll) / ntok), rel_tol=1e-5)


def test_perplexity_on_a_user_text_file_and_baseline_deltas(tiny_llama, adaptkit_pm, tmp_path):
    m = tiny_llama()
    other = tiny_llama.perturbed(m, scale=0.2)
    text = tmp_path / "notes.txt"
    text.write_text("First paragraph of my own text.\n\nSecond paragraph, a little longer than the first.\n")
    res = _run(adaptkit_pm, m, "perplexity", [TaskSpec("notes", text)], baseline=other)
    own = res.metric("bits_per_byte", "notes")
    alone = _run(adaptkit_pm, other, "perplexity", [TaskSpec("notes", text)]).metric("bits_per_byte", "notes")
    assert own.baseline == pytest.approx(alone.value, rel=1e-6)
    assert own.n == len("First paragraph of my own text.".encode()) + len(
        "Second paragraph, a little longer than the first.".encode())


def test_unknown_task_is_a_config_error(tiny_llama, adaptkit_pm):
    with pytest.raises(ConfigError, match="unknown task 'flores_en' for evaluator 'perplexity'; did you mean 'flores_eng'"):
        _run(adaptkit_pm, tiny_llama(), "perplexity", ["flores_en"])


def test_agreement_against_float64_reference(tiny_llama, adaptkit_pm):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adaptkit_eval import catalog

    m = tiny_llama()
    other = tiny_llama.perturbed(m, scale=0.3, seed=5)
    res = _run(adaptkit_pm, m, "agreement", ["flores_eng"], baseline=other, limit=6)
    top1, kl = res.metric("top1_agreement", "flores_eng"), res.metric("kl_divergence", "flores_eng")
    # reference: one unbatched forward per sentence, float64, torch's kl_div
    tok = AutoTokenizer.from_pretrained(str(m))
    a = AutoModelForCausalLM.from_pretrained(str(m), dtype=torch.float32).eval()
    b = AutoModelForCausalLM.from_pretrained(str(other), dtype=torch.float32).eval()
    agree = n = 0
    kl_sum = 0.0
    with torch.inference_mode():
        for t in catalog.text_documents(catalog.resolve("agreement", "flores_eng"), 6):
            ids = torch.tensor([[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"]])[:, :-1]
            la = torch.log_softmax(a(input_ids=ids).logits[0].double(), -1)
            lb = torch.log_softmax(b(input_ids=ids).logits[0].double(), -1)
            kl_sum += float(torch.nn.functional.kl_div(la, lb, log_target=True, reduction="sum"))
            agree += int((la.argmax(-1) == lb.argmax(-1)).sum())
            n += ids.shape[1]
    assert top1.n == n and top1.value == pytest.approx(agree / n, abs=1.5 / n)
    assert kl.value == pytest.approx(kl_sum / n, rel=1e-3)
    assert top1.baseline == 1.0 and kl.baseline == 0.0
    same = _run(adaptkit_pm, m, "agreement", ["flores_eng"], baseline=m, limit=3)
    assert same.metric("top1_agreement").value == 1.0 and abs(same.metric("kl_divergence").value) < 1e-6


def test_agreement_needs_a_baseline(tiny_llama, adaptkit_pm):
    with pytest.raises(ConfigError, match="compares against a baseline"):
        _run(adaptkit_pm, tiny_llama(), "agreement", ["flores_eng"])


def _mc_reference(model, tok, doc) -> int:
    """Index of the choice with the highest summed log-probability after the query (lm-eval's `acc` rule:
    the continuation is the whole string's tokens after the query's)."""
    ctx = tok(doc["query"], add_special_tokens=False)["input_ids"]
    scores = []
    for choice in doc["choices"]:
        whole = tok(doc["query"] + " " + choice, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            logp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].double(), -1)
        scores.append(sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole))))
    return max(range(len(scores)), key=scores.__getitem__)


def test_lmeval_multiple_choice_accuracy_and_bits_per_byte(tiny_llama, adaptkit_pm, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adaptkit_eval.data import analogy_mc

    cache = tmp_path / "lm-cache"
    cache.mkdir()
    monkeypatch.setenv("LM_HARNESS_CACHE_PATH", str(cache))
    m = tiny_llama()
    res = _run(adaptkit_pm, m, "lmeval", ["analogy_mc", "flores_eng"], limit=8)
    acc = res.metric("acc", "analogy_mc")
    tok = AutoTokenizer.from_pretrained(str(m))
    model = AutoModelForCausalLM.from_pretrained(str(m), dtype=torch.float32).eval()
    docs = analogy_mc()[:8]
    want = sum(_mc_reference(model, tok, d) == d["gold"] for d in docs) / len(docs)
    assert acc.value == pytest.approx(want) and acc.n == 8 and acc.stderr is not None
    ours = _run(adaptkit_pm, m, "perplexity", ["flores_eng"], limit=8).metric("bits_per_byte")
    assert res.metric("bits_per_byte", "flores_eng").value == pytest.approx(ours.value, abs=1e-5)
    assert list(cache.iterdir()) == []  # no request cache, no response database


def test_lmeval_sees_only_the_shipped_tasks():
    pytest.importorskip("lm_eval")
    from adaptkit_eval.lmeval import task_manager

    assert sorted(task_manager().all_tasks) == ["analogy_mc", "flores_eng", "pydoc_topics", "wiki_en"]


# -- probes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("probe, text, ok", [
    ({"check": "exact", "exact": "Paris"}, "  Paris\n", True),
    ({"check": "exact", "exact": "Paris"}, "Paris.", False),
    ({"check": "regex", "regex": r"(?i)\bparis\b"}, "It is PARIS, of course", True),
    ({"check": "regex", "regex": r"^\d+$"}, "42 apples", False),
    ({"check": "json_schema", "json_schema": {"type": "object", "required": ["a"]}}, '{"a": 1}', True),
    ({"check": "json_schema", "json_schema": {"type": "object", "required": ["a"]}},
     'Sure:\n```json\n{"a": [1, 2]}\n```\nHope this helps.', True),
    ({"check": "json_schema", "json_schema": {"type": "object", "required": ["a"]}}, '{"b": 1}', False),
    ({"check": "json_schema", "json_schema": {"type": "array", "items": {"type": "integer"}}}, "[1, 2, 3.5]", False),
    ({"check": "json_schema", "json_schema": {"type": "object"}}, "{'a': 1}", False),
])
def test_probe_checks(probe, text, ok):
    from adaptkit_eval.probes import check_output

    assert check_output(probe, text)[0] is ok


@pytest.mark.parametrize("lines, needle", [
    (['{"id": "a", "prompt": "x"}'], "needs exactly one check"),
    (['{"id": "a", "prompt": "x", "regex": "("}'], "invalid regex"),
    (['{"id": "a", "prompt": "x", "exact": "y"}', '{"id": "a", "prompt": "z", "exact": "y"}'], "used twice"),
    (['{"prompt": "x", "exact": "y"}'], "needs a string 'id'"),
    (['{"id": "a", "prompt": "x", "exact": "y", "temperature": 1}'], "unknown key 'temperature'"),
    (['{"id": "a", "prompt": "x", "json_schema": {"type": "nope"}}'], "invalid JSON schema"),
    (['not json'], "not valid JSON"),
])
def test_malformed_probe_files(tmp_path, lines, needle):
    from adaptkit_eval.probes import read_probes

    p = tmp_path / "p.jsonl"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as err:
        read_probes(p)
    assert needle in err.value.one_line() and str(p) in err.value.one_line()


def test_probes_generate_greedily(tiny_llama, adaptkit_pm, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adaptkit_eval.probes import prompt_ids

    m = tiny_llama()
    p = tmp_path / "p.jsonl"
    p.write_text('{"id": "any", "prompt": "Tell me a story.", "regex": "(?s).*", "max_new_tokens": 6}\n'
                 '{"id": "none", "prompt": "Tell me a story.", "exact": "\\u0000", "max_new_tokens": 6}\n')
    res = _run(adaptkit_pm, m, "probes", [TaskSpec("p", p)])
    assert res.metric("pass_rate", "p").value == 0.5
    rows = res.details["probes"]["p"]
    # reference greedy decoding: argmax token by token, no cache
    tok = AutoTokenizer.from_pretrained(str(m))
    model = AutoModelForCausalLM.from_pretrained(str(m), dtype=torch.float32).eval()
    ids = prompt_ids(tok, {"id": "any", "prompt": "Tell me a story."})
    out = []
    with torch.inference_mode():
        for _ in range(6):
            nxt = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            out.append(nxt)
    assert rows[0]["output"] == tok.decode(out, skip_special_tokens=True)


def test_probes_batched_by_length_equal_greedy_decoding_one_by_one(tiny_llama):
    """Probes are generated in batches of equal prompt length; each reply must be the reference greedy decoding
    of its own prompt (argmax token by token, no cache, float64), cut at its first EOS."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adaptkit_eval.probes import generate_all, prompt_ids

    m = tiny_llama()
    tok = AutoTokenizer.from_pretrained(str(m))
    model = AutoModelForCausalLM.from_pretrained(str(m), dtype=torch.float64).eval()
    texts = ["Tell me a story.", "Tell me a joke.", "Name a colour.", "Name a fruit.", "Why is the sky blue?",
             "Count to three.", "Say hi."]
    prompts = [prompt_ids(tok, {"id": str(i), "prompt": t}) for i, t in enumerate(texts)]
    assert len({len(p) for p in prompts}) < len(prompts)  # some share a length (batched together)

    def reference(ids, n, eos):
        out = []
        with torch.inference_mode():
            for _ in range(n):
                nxt = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
                out.append(nxt)
                if nxt == eos:
                    break
        return tok.decode(out, skip_special_tokens=True), out

    _, first = reference(prompts[0], 5, None)
    tok.eos_token = tok.convert_ids_to_tokens(first[2])  # an EOS that the first probe reaches at its 3rd token
    eos = tok.eos_token_id
    lengths = [5, 5, 5, 5, 7, 5, 5]
    calls = []
    got = generate_all(model, tok, prompts, lengths, on_done=calls.append)
    want = [reference(p, n, eos)[0] for p, n in zip(prompts, lengths)]
    assert got == want
    assert sum(calls) == len(prompts) and len(calls) < len(prompts)
