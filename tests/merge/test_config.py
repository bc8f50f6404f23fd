"""Merge-config parsing (no models needed): mergekit's schema is accepted, typos are one-line errors
naming the nearest valid key, structure errors name their location."""
from __future__ import annotations

import pytest
import yaml

from adaptkit.config import dump_merge_config, load_merge_config, parse_merge_config
from adaptkit.errors import ConfigError

MERGEKIT_SLERP = """
slices:
  - sources:
      - model: psmathur/orca_mini_v3_13b
        layer_range: [0, 40]
      - model: garage-bAInd/Platypus2-13B
        layer_range: [0, 40]
merge_method: slerp
base_model: psmathur/orca_mini_v3_13b
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float16
"""

MERGEKIT_TIES = """
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      density: [1, 0.7, 0.1]
      weight: 1.0
  - model: garage-bAInd/Platypus2-13B
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1]
  - model: TheBloke/Llama-2-13B-fp16
merge_method: ties
base_model: TheBloke/Llama-2-13B-fp16
parameters:
  normalize: true
  int8_mask: true
dtype: float16
tokenizer_source: union
chat_template: auto
"""


def test_mergekit_documentation_examples_parse():
    s = parse_merge_config(yaml.safe_load(MERGEKIT_SLERP), source="slerp.yml")
    assert s.merge_method == "slerp" and s.slices[0].sources[1].layer_range == (0, 40)
    assert s.out_dtype_code == "F16"
    t = parse_merge_config(yaml.safe_load(MERGEKIT_TIES), source="ties.yml")
    assert t.models[1].parameters["weight"] == [0, 0.3, 0.7, 1]
    assert t.tokenizer_source == "union" and t.chat_template == "auto"
    # the dump is mergekit-style YAML that parses back to the same config
    again = parse_merge_config(yaml.safe_load(dump_merge_config(t)), source="x")
    assert again == t


@pytest.mark.parametrize(
    "text,message",
    [
        ("merge_method: linear\nmodles:\n  - model: a\n", "x.yml: unknown key 'modles'; did you mean 'models'?"),
        ("merge_method: linear\nmodels:\n  - modle: a\n", "unknown key 'modle' in models[0]; did you mean 'model'?"),
        ("merge_method: slerp\nslices:\n  - sources:\n      - model: a\n        layer_rang: [0, 2]\n",
         "unknown key 'layer_rang' in slices[0].sources[0]; did you mean 'layer_range'?"),
        ("merge_method: slerp\nslices:\n  - source:\n      - model: a\n", "unknown key 'source' in slices[0]; did you mean 'sources'?"),
        ("merge_method: linear\nmodels:\n  - model: a\nslices:\n  - sources:\n      - {model: a, layer_range: [0, 1]}\n",
         "exactly one of 'models' or 'slices'"),
        ("merge_method: linear\n", "exactly one of 'models' or 'slices'"),
        ("models:\n  - model: a\n", "missing required key 'merge_method'"),
        ("merge_method: linear\nmodels:\n  - model: a\ndtype: fp33\n", "unknown dtype 'fp33'"),
        ("merge_method: slerp\nslices:\n  - sources:\n      - {model: a, layer_range: [3, 1]}\n", "layer_range must be"),
        ("merge_method: linear\nmodels:\n  - a\n", "models[0] must be a mapping like '- model: a'"),
        ("merge_method: linear\nmodules: {}\nmodels:\n  - model: a\n", "multi-module configs"),
        ("merge_method: linear\nmodels: [\n", "invalid YAML at line"),
        ("- 1\n- 2\n", "must be a YAML mapping"),
        ("", "config file is empty"),
    ],
)
def test_config_errors_are_one_line_and_point_at_the_key(tmp_path, text, message):
    p = tmp_path / "x.yml"
    p.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_merge_config(p)
    line = info.value.one_line()
    assert message in line, line
    assert "\n" not in line


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_merge_config(tmp_path / "nope.yml")
