"""The four kinds share one path: declared capabilities checked at registration, one runner per kind that
runs a Step through ``host.run_step`` and publishes through the one publisher. Trainer and evaluator plugins
here are in-process fakes that compute something checkable independently (hashlib, arithmetic)."""
from __future__ import annotations

import hashlib
import json
import types
from pathlib import Path

import pytest

from adaptkit import hookimpl
from adaptkit.errors import AdaptkitError, ConfigError, PluginError
from adaptkit.evaluate.api import EvalRequest, EvalResult, Metric, TaskSpec
from adaptkit.evaluate.runner import run_eval
from adaptkit.registry import Evaluator, Loader, Quantizer, Trainer
from adaptkit.train.api import AdapterSpec, DatasetSpec, TrainRequest, TrainResult
from adaptkit.train.runner import run_train


def _plugin(name: str, **hooks) -> types.SimpleNamespace:
    ns = types.SimpleNamespace(__name__=name, ADAPTKIT_DISTRIBUTION=name, **hooks)
    return ns


def _fake_train(request: TrainRequest) -> TrainResult:
    rows = [json.loads(x) for x in Path(request.train_data.path).read_text().splitlines() if x.strip()]
    (request.output / "adapter_config.json").write_text(json.dumps({"r": request.adapter.r}))
    (request.output / "rows.txt").write_text(str(len(rows)))
    for step in range(1, 4):
        request.report(step, 3, {"loss": 1.0 / step})
    return TrainResult(metrics={"train_rows": float(len(rows)), "scale": request.options["scale"]}, steps=3)


def _failing_train(request: TrainRequest) -> TrainResult:
    (request.output / "partial.bin").write_bytes(b"x" * 100)
    raise AdaptkitError("trainer blew up midway")


def _trainers(registry) -> None:
    from adaptkit.registry import Param

    registry.register(Trainer(name="fake-sft", impl=_fake_train, data_formats=("messages", "prompt_completion"),
                              adapters=("lora", "dora"), params=(Param("scale", float, 1.0, scope="global"),)))
    registry.register(Trainer(name="fake-fail", impl=_failing_train, data_formats=("messages",)))


def _dataset(tmp_path: Path, n: int = 5) -> Path:
    p = tmp_path / "train.jsonl"
    p.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"}]}) for i in range(n)))
    return p


@pytest.fixture
def host(adaptkit_pm_factory):
    seen = []

    @hookimpl(wrapper=True)
    def adaptkit_run_step(step):
        seen.append((step.kind, step.name))
        return (yield)

    h = adaptkit_pm_factory(load_entrypoints=False, extra_plugins=[
        _plugin("fake_trainers", adaptkit_register_trainers=hookimpl(_trainers)),
        _plugin("step_spy", adaptkit_run_step=adaptkit_run_step),
    ])
    h.seen = seen
    return h


def test_train_runner_publishes_with_provenance_and_manifest(host, tiny_llama, tmp_path) -> None:
    base = tiny_llama()
    data = _dataset(tmp_path, 7)
    out = tmp_path / "out"
    ticks = []
    req = TrainRequest(model=base, method="fake-sft", train_data=DatasetSpec(data, "messages"), output=Path(),
                       adapter=AdapterSpec(kind="dora", r=4), options={"scale": 2.5},
                       progress=lambda s, t, m: ticks.append((s, t, m["loss"])))
    result = run_train(req, out, host=host)
    assert result.metrics == {"train_rows": 7.0, "scale": 2.5}
    assert ticks[-1] == (3, 3, pytest.approx(1 / 3))
    assert ("train", "fake-sft") in host.seen
    doc = json.loads((out / "adaptkit.json").read_text())
    want = hashlib.sha256((base / "model.safetensors").read_bytes()).hexdigest()
    assert doc["kind"] == "train" and doc["base"]["sha256"] == {"model.safetensors": want}
    assert doc["request"]["adapter"]["kind"] == "dora" and doc["result"]["steps"] == 3
    manifest = json.loads((out / "adaptkit-manifest.json").read_text())["files"]
    for name in ("adapter_config.json", "rows.txt", "README.md", "adaptkit.json"):
        assert manifest[name]["sha256"] == hashlib.sha256((out / name).read_bytes()).hexdigest()
    assert (out / "rows.txt").read_text() == "7"


@pytest.mark.parametrize("change,needle", [
    ({"adapter": AdapterSpec(kind="ia3")}, "cannot train a 'ia3' adapter"),
    ({"train_data": "preference"}, "does not train on 'preference' rows"),
    ({"options": {"scael": 1.0}}, "did you mean 'scale'"),
    ({"rewards": ("exact",)}, "does not use rewards"),
    ({"method": "fake-sfx"}, "did you mean 'fake-sft'"),
])
def test_train_request_checked_before_anything_runs(host, tiny_llama, tmp_path, change, needle) -> None:
    data = _dataset(tmp_path)
    kw = dict(model=tiny_llama(), method="fake-sft", train_data=DatasetSpec(data, "messages"), output=Path())
    if change.get("train_data"):
        change = {"train_data": DatasetSpec(data, change["train_data"])}
    kw.update(change)
    with pytest.raises(ConfigError, match=needle):
        run_train(TrainRequest(**kw), tmp_path / "out", host=host)
    assert not (tmp_path / "out").exists() and host.seen == []


def test_failing_trainer_leaves_nothing(host, tiny_llama, tmp_path) -> None:
    req = TrainRequest(model=tiny_llama(), method="fake-fail", train_data=DatasetSpec(_dataset(tmp_path), "messages"),
                       output=Path())
    with pytest.raises(AdaptkitError, match="blew up"):
        run_train(req, tmp_path / "out", host=host)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith((".", "out"))]


def _count_bytes(request: EvalRequest) -> EvalResult:
    """A toy evaluator: bytes of model.safetensors (checked against os.stat in the test)."""
    size = (Path(request.model) / "model.safetensors").stat().st_size
    metrics = [Metric("weight_bytes", float(size), higher_is_better=False, task=t.name) for t in request.tasks]
    if request.options.get("leak"):
        metrics.append(Metric("undeclared", 1.0, True))
    return EvalResult(evaluator="bytes", metrics=metrics)


def _evaluators(registry) -> None:
    from adaptkit.registry import Param

    registry.register(Evaluator(name="bytes", impl=_count_bytes, metrics=(("weight_bytes", False),),
                                params=(Param("leak", bool, False, scope="global"),)))
    registry.register(Evaluator(name="needs-base", impl=_count_bytes, metrics=(("weight_bytes", False),),
                                needs_baseline=True))


def test_eval_runner_fills_baseline_and_checks_declared_metrics(adaptkit_pm_factory, tiny_llama) -> None:
    seen = []

    @hookimpl(wrapper=True)
    def adaptkit_run_step(step):
        seen.append(step.kind)
        return (yield)

    host = adaptkit_pm_factory(load_entrypoints=False, extra_plugins=[
        _plugin("fake_evals", adaptkit_register_evaluators=hookimpl(_evaluators)),
        _plugin("spy", adaptkit_run_step=adaptkit_run_step)])
    small, big = tiny_llama(), tiny_llama(hidden_size=96)
    res = run_eval(EvalRequest(model=big, evaluator="bytes", tasks=(TaskSpec("t1"),), baseline=small), host=host)
    m = res.metric("weight_bytes")
    assert m.value == (big / "model.safetensors").stat().st_size
    assert m.baseline == (small / "model.safetensors").stat().st_size
    assert m.delta > 0 and m.improved is False  # more bytes, lower is better
    assert seen == ["eval", "eval"]
    with pytest.raises(AdaptkitError, match="undeclared metric 'undeclared'"):
        run_eval(EvalRequest(model=small, evaluator="bytes", options={"leak": True}), host=host)
    with pytest.raises(ConfigError, match="compares against a baseline"):
        run_eval(EvalRequest(model=small, evaluator="needs-base"), host=host)


@pytest.mark.parametrize("component,needle", [
    (Quantizer(name="q1", impl="x:y", formats=("exl2",)), "declares unknown format 'exl2'"),
    (Quantizer(name="q2", impl="x:y", formats=("gptq",), accepts=("groupsize",)), "unknown option 'groupsize'"),
    (Quantizer(name="q3", impl="x:y"), "declares no output format"),
    (Trainer(name="t1", impl="x:y", adapters=("lorra",)), "unknown adapter kind 'lorra'"),
])
def test_unknown_capability_fails_the_plugin_with_one_line(adaptkit_pm_factory, component, needle) -> None:
    hook = "adaptkit_register_quantizers" if isinstance(component, Quantizer) else "adaptkit_register_trainers"
    bad = _plugin("badplug", **{hook: hookimpl(lambda registry: registry.register(component))})
    host = adaptkit_pm_factory(load_entrypoints=False, extra_plugins=[bad])
    reg = host.quantizers if isinstance(component, Quantizer) else host.trainers
    rec = host.records["badplug"]
    assert rec.status == "failed" and needle in rec.errors[0] and "\n" not in rec.errors[0]
    with pytest.raises(ConfigError, match="failed to load: badplug"):
        reg.get(component.name)


def test_loader_that_raises_in_detect_is_a_plugin_error(adaptkit_cli, tiny_llama) -> None:
    def detect(path):
        raise RuntimeError("boom")

    plug = _plugin("rude", adaptkit_register_loaders=hookimpl(
        lambda registry: registry.register(Loader(name="rude", impl="x:y", detect=detect, priority=99))))
    model = tiny_llama()
    r = adaptkit_cli("inspect", model, extra_plugins=[plug])
    assert r.exit_code == 6
    assert r.stderr.strip().splitlines() == [f"error: loader rude:rude raised in detect({str(model)!r}): RuntimeError: boom"]


def test_input_no_loader_accepts_names_the_loaders(adaptkit_cli, tmp_path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.npz").write_bytes(b"PK")
    r = adaptkit_cli("inspect", tmp_path / "model")
    assert r.exit_code == 4
    line = r.stderr.strip()
    assert line.startswith(f"error: {tmp_path / 'model'}") and "loaders tried: " in line and "adaptkit:quantized" in line
    assert "adaptkit:gguf" in line and "adaptkit:safetensors" in line and "\n" not in line
    with pytest.raises(PluginError):
        raise PluginError("sanity")  # PluginError stays importable from adaptkit.errors
