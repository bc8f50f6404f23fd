"""Calibration data: sources, deterministic windows, and one-line errors for bad files."""
from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from adaptkit.errors import ConfigError  # noqa: E402
from adaptkit.quantize import calib  # noqa: E402


class CharTok:
    """A stand-in tokenizer: one id per character (so windows can be checked against the text)."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False, verbose=False):
        return {"input_ids": [ord(c) for c in text]}


class Req:
    def __init__(self, calib_src, nsamples=4, seqlen=16, seed=0):
        self.calib, self.nsamples, self.seqlen, self.seed = calib_src, nsamples, seqlen, seed


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_windows_come_from_the_text_and_are_deterministic(tmp_path):
    texts = [f"document {i}: " + "abcdefghij" * 5 for i in range(20)]
    f = _write(tmp_path / "c.jsonl", [{"text": t, "meta": 1} for t in texts])
    a = calib.calibration_ids(Req(str(f)), CharTok())
    b = calib.calibration_ids(Req(str(f)), CharTok())
    c = calib.calibration_ids(Req(str(f), seed=1), CharTok())
    assert a.shape == (4, 16) and a.dtype == torch.int64
    assert torch.equal(a, b) and not torch.equal(a, c)
    stream = "\x00".join(texts)  # EOS (id 0) joins the documents
    for row in a:
        assert "".join(map(chr, row.tolist())) in stream
    # enough text for disjoint windows: no two samples overlap
    starts = [stream.index("".join(map(chr, r.tolist()))) for r in a]
    assert len(set(starts)) == 4


def test_short_text_allows_overlapping_windows(tmp_path):
    f = _write(tmp_path / "c.jsonl", [{"text": "x" * 40}])
    ids = calib.calibration_ids(Req(str(f), nsamples=8, seqlen=16), CharTok())
    assert ids.shape == (8, 16)


def test_builtin_is_real_prose_without_markup(tmp_path):
    """builtin = the Lee news corpus + cleaned Wikipedia prose from gensim's wheel (disjoint from FLORES+)."""
    label, texts = calib.load_texts("builtin")
    _, news = calib.load_texts("builtin-news")
    _, wiki = calib.load_texts("builtin-wiki")
    assert texts == news + wiki and "news" in label.lower() and "wikipedia" in label.lower()
    assert len(news) == 300 and news[0].startswith("Hundreds of people have been forced to vacate their homes")
    assert len(wiki) > 50 and sum(map(len, wiki)) > 1_000_000
    albedo = next(t for t in wiki if t.startswith("Albedo"))
    assert "reflectivity or reflecting power of a surface" in albedo
    joined = "\n".join(wiki)
    for markup in ("{{", "}}", "[[", "]]", "<ref", "</ref", "{|", "|}", "&quot;", "''", "thumb|"):
        assert markup not in joined, markup
    # every kept line is a prose paragraph: long, starting like a sentence
    lines = joined.splitlines()
    assert all(len(ln) >= 60 and ln[0] not in "|!*#:;=[{" for ln in lines)
    ids = calib.calibration_ids(Req("builtin", nsamples=3, seqlen=64), CharTok())
    assert ids.shape == (3, 64)


def test_clean_wikitext_keeps_link_labels_and_drops_templates():
    body = ("{{Infobox|name=x}}'''Albedo''' is the [[reflection (physics)|reflectivity]] of a [[surface]], "
            "measured on a scale from 0 to 1.&lt;ref&gt;A source&lt;/ref&gt; It depends on the frequency.\n"
            "{| class=wikitable\n|-\n| cell text that is long enough to pass the length filter of sixty chars\n|}\n"
            "* a list item that is also long enough to pass the sixty character length filter\n"
            "[[File:Albedo.png|thumb|a caption]]")
    assert calib.clean_wikitext(body) == (
        "Albedo is the reflectivity of a surface, measured on a scale from 0 to 1. It depends on the frequency."
    )


def test_pydoc_source_needs_nothing_but_python():
    label, texts = calib.load_texts("builtin-pydoc")
    assert "pydoc_data" in label and sum(map(len, texts)) > 100_000


@pytest.mark.parametrize(
    "content,match",
    [
        (None, "does not exist"),
        ("", "no non-empty"),
        ("\n\n", "no non-empty"),
        ('{"text": "ok"}\nnot json\n', r":2: not valid JSON"),
        ('{"txt": "no text key"}\n', r":1: .*string \"text\" field"),
        ('["text"]\n', r":1: .*JSON object"),
    ],
)
def test_bad_calibration_files(tmp_path, content, match):
    f = tmp_path / "bad.jsonl"
    if content is not None:
        f.write_text(content)
    with pytest.raises(ConfigError, match=match) as exc:
        calib.calibration_ids(Req(str(f)), CharTok())
    assert str(f) in exc.value.one_line() and "\n" not in exc.value.one_line()


def test_too_short_calibration_text(tmp_path):
    f = _write(tmp_path / "short.jsonl", [{"text": "tiny"}])
    with pytest.raises(ConfigError, match=r"too short: 4 tokens, needs at least --seqlen 16"):
        calib.calibration_ids(Req(str(f)), CharTok())


def test_bad_counts():
    with pytest.raises(ConfigError, match="nsamples"):
        calib.sample_windows(torch.arange(100), 0, 10, 0)
    with pytest.raises(ConfigError, match="seqlen"):
        calib.sample_windows(torch.arange(100), 2, 0, 0)
