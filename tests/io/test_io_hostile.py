"""Hostile and corrupt safetensors files, crafted byte by byte: each must be refused with a one-line
CheckpointError naming the file and the rule broken."""
from __future__ import annotations

import json
import struct

import pytest
from tests.io._helpers import entry, st_bytes

from adaptkit.errors import CheckpointError
from adaptkit.io import MAX_HEADER_SIZE, SafetensorsFile

F32x2 = entry("F32", [2], 0, 8)


def _expect(path, *fragments):
    with pytest.raises(CheckpointError) as ei:
        SafetensorsFile(path)
    msg = str(ei.value)
    assert "\n" not in msg
    assert str(path) in msg, msg
    for frag in fragments:
        assert frag in msg, msg
    return msg


def test_empty_file(tmp_path):
    p = tmp_path / "empty.safetensors"
    p.write_bytes(b"")
    _expect(p, "truncated", "0 bytes")


def test_truncated_before_header_length(tmp_path):
    p = tmp_path / "short.safetensors"
    p.write_bytes(b"\x10\x00\x00")
    _expect(p, "truncated", "3 bytes")


def test_header_longer_than_file(craft):
    p = craft("long.safetensors", '{"a":1}', length=4096)
    _expect(p, "header length 4096", "past the end of the file")


def test_header_length_over_100mb(craft):
    p = craft("huge.safetensors", "{}", length=MAX_HEADER_SIZE + 1)
    _expect(p, f"header length {MAX_HEADER_SIZE + 1}", "limit")


def test_header_length_max_u64(tmp_path):
    p = tmp_path / "u64.safetensors"
    p.write_bytes(struct.pack("<Q", 2**64 - 1) + b"{}")
    _expect(p, "exceeds")


def test_truncated_data(craft):
    p = craft("trunc.safetensors", {"a": entry("F32", [4], 0, 16)}, b"\0" * 10)
    _expect(p, "tensor 'a'", "past the end of the data buffer")


def test_not_json(craft):
    _expect(craft("nj.safetensors", "{not json"), "not valid JSON")


def test_not_utf8(craft):
    _expect(craft("nu.safetensors", b'{"\xff\xfe":1}'), "not valid UTF-8")


def test_json_array(craft):
    _expect(craft("arr.safetensors", "[1, 2, 3]"), "not a JSON object", "list")


def test_duplicate_tensor_keys(craft):
    raw = '{"a": %s, "a": %s}' % (json.dumps(entry("F32", [1], 0, 4)), json.dumps(entry("F32", [1], 4, 8)))
    _expect(craft("dup.safetensors", raw, b"\0" * 8), "duplicate key 'a'")


def test_duplicate_keys_inside_entry(craft):
    raw = '{"a": {"dtype": "F32", "dtype": "I32", "shape": [1], "data_offsets": [0, 4]}}'
    _expect(craft("dup2.safetensors", raw, b"\0" * 4), "duplicate key 'dtype'")


def test_nan_constant(craft):
    raw = '{"a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 4]}}'
    _expect(craft("nan.safetensors", raw, b"\0" * 4), "not valid JSON")


def test_unknown_dtype(craft):
    _expect(craft("dt.safetensors", {"w": entry("F128", [1], 0, 16)}, b"\0" * 16), "tensor 'w'", "unknown dtype 'F128'")


def test_dtype_not_string(craft):
    _expect(craft("dt2.safetensors", {"w": entry(4, [1], 0, 4)}, b"\0" * 4), "unknown dtype 4")


@pytest.mark.parametrize("shape", [[-1], [2.0], [True], "2", [[2]]])
def test_bad_shape(craft, shape):
    _expect(craft("shape.safetensors", {"w": entry("F32", shape, 0, 8)}, b"\0" * 8), "tensor 'w'", "shape must be")


@pytest.mark.parametrize("offs", [[0], [0, 4, 8], [-4, 4], ["0", "4"], None, [0.0, 4.0]])
def test_bad_offsets(craft, offs):
    h = {"w": {"dtype": "F32", "shape": [1], "data_offsets": offs}}
    _expect(craft("offs.safetensors", h, b"\0" * 4), "tensor 'w'", "data_offsets must be")


def test_end_before_begin(craft):
    _expect(craft("rev.safetensors", {"w": entry("U8", [0], 4, 0)}, b"\0" * 4), "tensor 'w'", "before begin")


@pytest.mark.parametrize("missing", ["dtype", "shape", "data_offsets"])
def test_missing_field(craft, missing):
    e = dict(F32x2)
    del e[missing]
    _expect(craft("miss.safetensors", {"w": e}, b"\0" * 8), "tensor 'w'", f"missing '{missing}'")


def test_entry_not_object(craft):
    _expect(craft("eno.safetensors", {"w": [1, 2]}), "tensor 'w'", "entry must be an object")


def test_wrong_byte_count(craft):
    p = craft("count.safetensors", {"w": entry("F32", [3], 0, 8)}, b"\0" * 8)
    _expect(p, "tensor 'w'", "byte count 8", "(12 bytes)")


def test_overlapping_offsets(craft):
    h = {"a.weight": entry("F32", [16], 0, 64), "b.weight": entry("F32", [16], 32, 96)}
    msg = _expect(craft("model.safetensors", h, b"\0" * 96))
    assert msg.endswith("model.safetensors: tensor 'b.weight' overlaps 'a.weight' (bytes 32-96 vs 0-64)")


def test_identical_offsets_overlap(craft):
    h = {"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 0, 8)}
    _expect(craft("same.safetensors", h, b"\0" * 8), "overlaps")


def test_empty_tensor_inside_another_overlaps(craft):
    h = {"a": entry("F32", [2], 0, 8), "z": entry("F32", [0], 4, 4)}
    _expect(craft("zin.safetensors", h, b"\0" * 8), "tensor 'z' overlaps 'a'")


def test_gap_between_tensors(craft):
    h = {"a": entry("F32", [1], 0, 4), "b": entry("F32", [1], 8, 12)}
    _expect(craft("gap.safetensors", h, b"\0" * 12), "gap of 4 unused bytes after 'a'")


def test_gap_at_start(craft):
    h = {"a": entry("F32", [1], 4, 8)}
    _expect(craft("gap0.safetensors", h, b"\0" * 8), "gap of 4 unused bytes at the start")


def test_trailing_bytes(craft):
    _expect(craft("trail.safetensors", {"a": entry("F32", [1], 0, 4)}, b"\0" * 7), "3 trailing bytes")


def test_trailing_bytes_without_tensors(craft):
    _expect(craft("trail0.safetensors", {}, b"junk"), "4 trailing bytes")


@pytest.mark.parametrize("meta", [[1], "x", {"k": 1}, {"k": None}])
def test_bad_metadata(craft, meta):
    _expect(craft("meta.safetensors", {"__metadata__": meta}), "__metadata__")


def test_directory_is_not_a_file(tmp_path):
    d = tmp_path / "dir.safetensors"
    d.mkdir()
    _expect(d)


def test_missing_file(tmp_path):
    _expect(tmp_path / "nope.safetensors", "cannot open")


def test_valid_edge_cases_accepted(craft):
    """The rules must not reject legal files: empty header, zero-size tensors sharing an offset, padded header."""
    p = craft("ok0.safetensors", "{}")
    assert SafetensorsFile(p).infos == {}
    h = {"e1": entry("F32", [0, 3], 0, 0), "a": entry("U8", [2], 0, 2), "e2": entry("BF16", [0], 2, 2)}
    raw = json.dumps(h).encode()
    raw += b" " * (-len(raw) % 8)
    p = craft("ok1.safetensors", raw, b"\x07\x09")
    f = SafetensorsFile(p)
    assert f.get("a").tolist() == [7, 9]
    assert tuple(f.get("e1").shape) == (0, 3)
    assert st_bytes({}) == b"\x02" + b"\0" * 7 + b"{}"
