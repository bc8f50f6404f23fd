"""GRPO rewards against hand-computed values (no torch)."""
from __future__ import annotations

import json

import pytest

from adaptkit.errors import ConfigError

rewards = pytest.importorskip("adaptkit_trl.rewards")


def test_exact_match_normalises_and_extracts() -> None:
    comps = ["  42 ", "The answer is 42.", "41", "forty-two"]
    assert rewards.exact_match([""] * 4, comps, answer=["42"] * 4) == [1.0, 0.0, 0.0, 0.0]
    got = rewards.exact_match([""] * 4, comps, answer=["42"] * 4, extract=r"(\d+)")
    assert got == [1.0, 1.0, 0.0, 0.0]
    assert rewards.exact_match([""], ["Paris"], city=["paris"], field="city") == [1.0]
    assert rewards.exact_match([""], ["Paris"], city=["paris"], field="city", normalize=False) == [0.0]
    with pytest.raises(ConfigError, match="needs a dataset column 'answer'"):
        rewards.exact_match([""], ["x"])


def test_regex_modes() -> None:
    comps = ["<answer>7</answer>", "so <answer>7</answer> ok", "7"]
    assert rewards.regex([""] * 3, comps, pattern=r"<answer>\d+</answer>") == [1.0, 1.0, 0.0]
    assert rewards.regex([""] * 3, comps, pattern=r"<answer>\d+</answer>", mode="fullmatch") == [1.0, 0.0, 0.0]


def test_json_schema_scores() -> None:
    schema = json.dumps({"type": "object", "required": ["name", "age"], "additionalProperties": False,
                         "properties": {"name": {"type": "string", "minLength": 1},
                                        "age": {"type": "integer", "minimum": 0}}})
    comps = ['{"name": "Ada", "age": 36}', '```json\n{"name": "Ada", "age": 36}\n```', '{"name": "Ada", "age": -1}',
             '{"name": "Ada", "age": 36, "x": 1}', '{"name": "Ada"}', "not json", '["Ada", 36]']
    assert rewards.json_schema([""] * 7, comps, schema=schema) == [1.0, 1.0, 0.5, 0.5, 0.5, 0.0, 0.5]
    assert rewards.json_schema([""] * 2, ["[1, 2]", "{"], schema="{}") == [1.0, 0.0]
    with pytest.raises(ConfigError, match="keyword '\\$ref' is not supported"):
        rewards.json_schema([""], ["{}"], schema=json.dumps({"$ref": "#/x"}))


def test_schema_subset_agrees_with_jsonschema_when_installed() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
                                               "n": {"anyOf": [{"type": "integer"}, {"type": "null"}]}}}
    for doc in ({"tags": ["a"]}, {"tags": ["c"]}, {"tags": ["a", "b", "a"]}, {"n": None}, {"n": "x"}, {"n": 3}):
        ok = jsonschema.Draft7Validator(schema).is_valid(doc)
        assert (not rewards.schema_errors(doc, schema)) == ok, doc


def test_length_penalty_formula() -> None:
    comps = ["abcd", "abcdefgh", "abcdefghijkl", "one two three four five six"]
    assert rewards.length_penalty([""] * 4, comps, target=8) == [0.0, 0.0, -0.5, -(27 - 8) / 8]
    assert rewards.length_penalty([""], [comps[3]], target=3, unit="words", scale=2.0) == [-2.0]


def test_rewards_are_registered_with_their_options(adaptkit_pm_factory) -> None:
    host = adaptkit_pm_factory()
    for name in ("exact_match", "regex", "json_schema", "length_penalty"):
        assert name in host.rewards.names()
    with pytest.raises(ConfigError, match="regex needs option 'pattern'"):
        host.rewards.get("regex").resolve_options({})
    with pytest.raises(ConfigError, match="did you mean 'target'"):
        host.rewards.get("length_penalty").resolve_options({"targt": 3})
