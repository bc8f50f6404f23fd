"""Seeing it train: the progress bar (step, loss, tokens/s, ETA), evaluation every N steps with the best
checkpoint kept, early stopping, TensorBoard event files, --resume, the pad == eos warning."""
from __future__ import annotations

import json

import pytest

from adaptkit.errors import AdaptkitError

from .conftest import chat_rows, read_log, run_recipe, write_jsonl, write_recipe

torch = pytest.importorskip("torch")
pytest.importorskip("trl")


def _recipe(tmp_path, base, **training):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(24))
    t = {"max_steps": 4, "batch_size": 4, "learning_rate": 5e-3, "max_seq_len": 64}
    t.update(training)
    return write_recipe(tmp_path / "r.yml", base=str(base), method="sft", data={"train": str(data), "eval_split": 0.25},
                        adapter={"kind": "lora", "r": 4}, training=t)


def test_cli_progress_bar_and_json_summary(adaptkit_cli, tiny_llama, tmp_path) -> None:
    recipe = _recipe(tmp_path, tiny_llama())
    out = tmp_path / "out"
    r = adaptkit_cli("train", recipe, "--output", out, "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)  # stdout is only the JSON document
    assert doc["steps"] == 4 and doc["tokens"] > 0 and doc["output"] == str(out)
    bar = [x for x in r.stderr.splitlines() if x.startswith("sft (lora) [")]
    assert bar and "4/4 steps" in bar[-1] and "loss " in bar[-1] and "tok/s" in bar[-1]
    assert "0/4 steps" in bar[0]  # the total is known from the start, so the bar shows an ETA while running
    assert (out / "adaptkit.json").is_file()


def test_eval_every_n_steps_keeps_the_best_checkpoint(train_host, tiny_llama, tmp_path) -> None:
    recipe = _recipe(tmp_path, tiny_llama(), max_steps=6, eval_every=2, learning_rate=2e-2)
    out = tmp_path / "out"
    result = run_recipe(train_host, recipe, out)
    evals = [e for e in read_log(out) if "eval_loss" in e]
    assert [e["step"] for e in evals] == [2, 4, 6]
    best = min(evals, key=lambda e: e["eval_loss"])
    assert result.best_checkpoint == f"checkpoint-{best['step']}"
    # the published adapter is the best one: evaluating it again gives the best eval loss
    assert result.metrics["eval_loss"] == pytest.approx(best["eval_loss"], rel=1e-5)
    assert result.metrics["best_eval_loss"] == pytest.approx(best["eval_loss"], rel=1e-5)


def test_early_stopping_stops_when_eval_loss_stops_improving(train_host, tiny_llama, tmp_path) -> None:
    # a learning rate far too high makes the eval loss rise: with patience 1 training stops early
    recipe = _recipe(tmp_path, tiny_llama(), max_steps=20, eval_every=1, early_stopping_patience=1, learning_rate=3.0)
    out = tmp_path / "out"
    result = run_recipe(train_host, recipe, out)
    evals = [e["eval_loss"] for e in read_log(out) if "eval_loss" in e]
    assert result.steps < 20
    # it stopped at the first evaluation that did not improve on the best before it
    assert evals[-1] >= min(evals[:-1]) and all(b < a for a, b in zip(evals[:-2], evals[1:-1]))


def test_tensorboard_event_files_in_the_output(train_host, tiny_llama, tmp_path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = _recipe(tmp_path, tiny_llama(), report_to="tensorboard")
    out = tmp_path / "out"
    run_recipe(train_host, recipe, out)
    files = list((out / "runs").rglob("events.out.tfevents.*"))
    assert files
    acc = EventAccumulator(str(files[0].parent))
    acc.Reload()
    losses = [s.value for s in acc.Scalars("train/loss")]
    logged = [e["loss"] for e in read_log(out) if "loss" in e]
    assert losses == pytest.approx(logged, rel=1e-5)


def test_resume_continues_an_interrupted_run_exactly(train_host, tiny_llama, tmp_path) -> None:
    base = tiny_llama()
    recipe = _recipe(tmp_path, base, max_steps=4, save_every=2)
    recipe_doc = recipe.read_text()
    full = run_recipe(train_host, recipe, tmp_path / "full")

    class Stop(AdaptkitError):
        pass

    def stop_at_3(step, total, metrics):
        if step == 3:
            raise Stop("interrupted")

    out = tmp_path / "out"
    with pytest.raises(Stop):
        run_recipe(train_host, recipe, out, progress=stop_at_3)
    assert not out.exists() and (tmp_path / ".out.adaptkit-train" / "checkpoint-2").is_dir()
    assert recipe.read_text() == recipe_doc
    resumed = run_recipe(train_host, recipe, out, resume=True)
    assert resumed.steps == 4 and not (tmp_path / ".out.adaptkit-train").exists()
    want = {e["step"]: e["loss"] for e in read_log(tmp_path / "full") if "loss" in e}
    got = {e["step"]: e["loss"] for e in read_log(out) if "loss" in e}
    assert got[3] == pytest.approx(want[3], rel=1e-4) and got[4] == pytest.approx(want[4], rel=1e-4)
    assert full.steps == 4


def test_resume_without_a_checkpoint_is_an_error(adaptkit_cli, tiny_llama, tmp_path) -> None:
    recipe = _recipe(tmp_path, tiny_llama())
    r = adaptkit_cli("train", recipe, "--output", tmp_path / "out", "--resume")
    assert r.exit_code == 3 and "--resume: no checkpoint to resume from" in r.stderr


def test_pad_equal_to_eos_is_warned(adaptkit_cli, tiny_llama, tmp_path) -> None:
    base = tiny_llama()
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    cfg["pad_token"] = cfg["eos_token"]
    (base / "tokenizer_config.json").write_text(json.dumps(cfg))
    recipe = _recipe(tmp_path, base, max_steps=1)
    out = tmp_path / "out"
    r = adaptkit_cli("train", recipe, "--output", out, "-q")
    assert r.exit_code == 0, r.stderr
    warns = [x for x in r.stderr.splitlines() if x.startswith("warning: pad token == eos token ('</s>')")]
    assert len(warns) == 1
    doc = json.loads((out / "adaptkit.json").read_text())
    assert doc["result"]["warnings"] == [warns[0].removeprefix("warning: ")]


def test_scheduler_and_warmup_are_honoured(train_host, tiny_llama, tmp_path) -> None:
    """The logged learning rates follow transformers' own scheduler built independently here (the rate each
    optimizer step used: transformers logs it before advancing the scheduler)."""
    from transformers import get_scheduler

    recipe = _recipe(tmp_path, tiny_llama(), max_steps=6, learning_rate=1e-3, lr_scheduler="cosine", warmup_ratio=0.5)
    out = tmp_path / "out"
    run_recipe(train_host, recipe, out, "data.eval_split=null")
    logged = [e["learning_rate"] for e in read_log(out) if "loss" in e]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = get_scheduler("cosine", opt, num_warmup_steps=3, num_training_steps=6)
    want = []
    for _ in range(6):
        opt.step()
        want.append(sched.get_last_lr()[0])
        sched.step()
    assert logged == pytest.approx(want, rel=1e-6, abs=1e-12)
    assert logged[0] < logged[2]  # warming up
