"""The start-up entry-point scan agrees with importlib.metadata (the reference implementation)."""
from __future__ import annotations

import importlib.util
from importlib import metadata

from adaptkit.entrypoints import entry_points
from tests.core.fakedist import make_dist


def _reference(group):
    out, seen = [], set()
    for dist in metadata.distributions():
        key = dist.metadata["Name"].lower().replace("_", "-").replace(".", "-")
        if key in seen:
            continue
        seen.add(key)
        for ep in dist.entry_points:
            if ep.group == group:
                out.append((dist.metadata["Name"], dist.version, ep.name, ep.value))
    return sorted(out)


def test_scan_matches_importlib_metadata_for_installed_groups():
    for group in ("adaptkit", "console_scripts", "pytest11"):
        ours = sorted((e.distribution, e.version, e.name, e.value) for e in entry_points(group))
        assert ours == _reference(group), group
    if importlib.util.find_spec("adaptkit_example_merge") is not None:
        assert any(e.distribution == "adaptkit-example-merge" for e in entry_points("adaptkit"))


def test_scan_of_fake_distributions_and_first_wins(tmp_path, monkeypatch):
    first, second = tmp_path / "a", tmp_path / "b"
    make_dist(first, "fake-dup", {"fake_dup_a": "X = 1\n"}, {"dup": "fake_dup_a:X"}, version="2.0")
    make_dist(second, "fake-dup", {"fake_dup_b": "X = 2\n"}, {"dup": "fake_dup_b:X"}, version="1.0")
    (first / "fake_dup-2.0.dist-info" / "entry_points.txt").write_text(
        "[console_scripts]\nx = y:z\n\n[adaptkit]\n# comment\ndup = fake_dup_a:X [extra]\n")
    monkeypatch.syspath_prepend(str(second))
    monkeypatch.syspath_prepend(str(first))
    ours = [e for e in entry_points("adaptkit") if e.distribution == "fake-dup"]
    ref = [(d.version, ep.value) for d in metadata.distributions() if d.metadata["Name"] == "fake-dup"
           for ep in d.entry_points if ep.group == "adaptkit"]
    assert [(e.version, e.value) for e in ours] == [ref[0]] == [("2.0", "fake_dup_a:X [extra]")]
    assert ours[0].load() == 1
