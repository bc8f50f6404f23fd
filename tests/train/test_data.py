"""Dataset rows are checked before training: the error names the file, the row (and JSON line) and the field.
Each case plants one defect at a known row and checks that exactly that row and field are reported."""
from __future__ import annotations

import json

import pytest

from adaptkit.errors import ConfigError
from adaptkit.train.data import check_dataset, infer_format

GOOD = {
    "messages": {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
    "prompt_completion": {"prompt": "p", "completion": "c"},
    "preference": {"prompt": "p", "chosen": "a", "rejected": "b"},
    "unpaired_preference": {"prompt": "p", "completion": "c", "label": True},
    "prompt": {"prompt": [{"role": "user", "content": "q"}], "answer": "4"},
    "text": {"text": "hello"},
}


@pytest.mark.parametrize("fmt,bad,needle", [
    ("preference", {"prompt": "p", "chosen": "a"}, "field 'rejected' is missing"),
    ("preference", {"prompt": "p", "chosen": "a", "rejected": 3}, "field 'rejected' must be a non-empty string or list of messages, got a number"),
    ("prompt_completion", {"prompt": "p", "completion": "  "}, "field 'completion' is an empty string"),
    ("unpaired_preference", {"prompt": "p", "completion": "c", "label": "yes"}, "field 'label' must be true or false, got 'yes'"),
    ("messages", {"messages": [{"role": "user"}]}, "field 'messages'[0] needs a string 'content'"),
    ("messages", {"messages": [{"role": "robot", "content": "x"}]}, "field 'messages'[0] has role 'robot'"),
    ("messages", {"messages": []}, "field 'messages' must be a non-empty list of messages, got a list"),
    ("text", {"txt": "x"}, "field 'text' is missing"),
])
def test_bad_row_is_named_with_its_field(tmp_path, fmt, bad, needle) -> None:
    rows = [GOOD[fmt]] * 4
    rows = rows[:2] + [bad] + rows[2:]  # the defect is row 3; a blank line before it shifts its line to 4
    text = "\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + "\n".join(json.dumps(r) for r in rows[2:]) + "\n"
    p = tmp_path / "d.jsonl"
    p.write_text(text)
    with pytest.raises(ConfigError) as err:
        check_dataset(p, fmt, what="train data")
    line = err.value.one_line()
    assert line.startswith(f"train data {p}: row 3 (line 4): {needle}")


def test_malformed_json_names_the_line(tmp_path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(GOOD["text"]) + "\n{\"text\": \"oops\"\n")
    with pytest.raises(ConfigError, match=r"^eval data .*d.jsonl: line 2: not valid JSON"):
        check_dataset(p, "text", what="eval data")


def test_parquet_rows_are_checked_too(tmp_path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b", "c"], "completion": ["x", "", "z"]}), p)
    with pytest.raises(ConfigError, match=r"d.parquet: row 2: field 'completion' is an empty string"):
        check_dataset(p, "prompt_completion")
    pq.write_table(pa.table({"prompt": ["a", "b"], "completion": ["x", "y"]}), p)
    assert check_dataset(p, "prompt_completion") == 2


def test_counts_rows_and_respects_max_rows(tmp_path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(GOOD["preference"]) + "\n" for _ in range(5)) + "not json\n")
    assert check_dataset(p, "preference", max_rows=5) == 5  # the broken 6th line is never read
    with pytest.raises(ConfigError, match="line 6"):
        check_dataset(p, "preference")
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(ConfigError, match="no rows"):
        check_dataset(tmp_path / "e.jsonl", "text")
    with pytest.raises(ConfigError, match=r"unsupported file type '\.csv'"):
        check_dataset(tmp_path / "d.csv", "text")


@pytest.mark.parametrize("fmt", list(GOOD))
def test_infer_format_round_trips(fmt) -> None:
    assert infer_format(GOOD[fmt]) == fmt
