"""The one publisher every command's output goes through.

``publish_output(target, kind=..., force=...)`` yields a :class:`Publication`: a fresh temporary folder beside
``target`` plus helpers to copy the auxiliary files (tokenizer, chat template, generation config), describe
the output in a model card and record its provenance. When the block succeeds the publisher writes

* ``README.md`` -- the model card (unless the block wrote one itself), from :meth:`Publication.card`;
* ``adaptkit.json`` -- provenance: adaptkit version, the kind of step, inputs (path and sha256 of their weight
  files where asked), settings and results;
* ``adaptkit-manifest.json`` -- sha256 and size of every other file (``adaptkit verify`` checks it);

then fsyncs everything and renames the folder into place in one step (``adaptkit.io.atomic``). An error,
Ctrl-C or SIGTERM (the CLI turns it into :class:`~adaptkit.errors.Terminated`) removes the temporary folder;
leftovers of processes killed outright (SIGKILL) are removed by the next publication in the same folder.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from adaptkit.io.atomic import atomic_output_dir
from adaptkit.io.aux_files import copy_aux_files
from adaptkit.io.manifest import MANIFEST_NAME, write_manifest

PROVENANCE_NAME = "adaptkit.json"
CARD_NAME = "README.md"


@dataclass
class Publication:
    """What a step writes into while its output is being built (``path`` is the temporary folder)."""

    path: Path
    target: Path
    kind: str
    title: str = ""
    summary: list[str] = field(default_factory=list)  #: card paragraphs (Markdown)
    sections: dict[str, str] = field(default_factory=dict)  #: card heading -> Markdown body
    tags: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)  #: merged into adaptkit.json
    card_text: str | None = None  #: a complete card that replaces the generated one

    def copy_aux(self, src: Any, *, config: bool = False) -> list[str]:
        """Copy tokenizer / chat template / generation config (and ``config.json`` if asked) from ``src``: a
        folder or file path, or an opened checkpoint. A checkpoint whose loader synthesises these files (a GGUF
        file carries its tokenizer inside) provides ``write_aux(dst, config=...)``; otherwise its ``path``
        folder is copied from."""
        if src is None:
            return []
        write_aux = getattr(src, "write_aux", None)
        if callable(write_aux):
            return list(write_aux(self.path, config=config))
        folder = getattr(src, "path", src)
        return copy_aux_files(folder, self.path, config=config)

    def write_json(self, name: str, doc: Any) -> Path:
        """Write ``doc`` as indented JSON to ``name`` inside the output (e.g. ``config.json``)."""
        p = self.path / name
        p.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        return p

    def card(self) -> str:
        """The model card: YAML front matter, title, summary, sections."""
        from adaptkit import __version__

        if self.card_text is not None:
            return self.card_text
        tags = ["adaptkit", *[t for t in self.tags if t != "adaptkit"]]
        lines = ["---", "library_name: transformers", "tags:", *[f"- {t}" for t in tags], "---",
                 f"# {self.title or self.target.name}", ""]
        for para in self.summary:
            lines += [para, ""]
        for heading, body in self.sections.items():
            lines += [f"### {heading}", "", body.rstrip(), ""]
        lines += [f"_Written by adaptkit {__version__} ({self.kind}); `{MANIFEST_NAME}` lists the sha256 of "
                  "every file._", ""]
        return "\n".join(lines)

    def _finish(self) -> None:
        from adaptkit import __version__

        if not (self.path / CARD_NAME).exists():
            (self.path / CARD_NAME).write_text(self.card(), encoding="utf-8")
        doc = {"adaptkit_version": __version__, "kind": self.kind,
               "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        doc.update(self.provenance)
        self.write_json(PROVENANCE_NAME, doc)
        write_manifest(self.path)


@contextlib.contextmanager
def publish_output(target: str | os.PathLike[str], *, kind: str, force: bool = False,
                   title: str = "") -> Iterator[Publication]:
    """Build an output folder atomically; see the module docstring. ``kind`` is the step kind (merge,
    quantize, dequantize, train, merge-adapter, ...), recorded in ``adaptkit.json``."""
    with atomic_output_dir(target, force=force) as tmp:
        pub = Publication(path=Path(tmp), target=Path(target), kind=kind, title=title)
        yield pub
        pub._finish()


def file_sha256(paths: list[Path]) -> dict[str, str]:
    """``{file name: sha256}`` of the given files (the identity of a model's weights)."""
    from adaptkit.io.manifest import _sha256

    return {Path(p).name: _sha256(Path(p)) for p in paths}
