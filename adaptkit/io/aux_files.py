"""Copy the non-weight files a model folder needs (tokenizer, chat template, generation config, config)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from adaptkit.errors import OutputError
from adaptkit.io.checkpoint import resolve_inside

#: Files copied by :func:`copy_aux_files`, in this order (``config.json`` last, only with ``config=True``).
AUX_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def copy_aux_files(
    src_dir: str | os.PathLike[str], dst_dir: str | os.PathLike[str], *, config: bool = True
) -> list[str]:
    """Copy the tokenizer / chat-template / generation-config files (and ``config.json`` if ``config``) that
    exist in ``src_dir`` (a folder, or a weights file whose folder is used) into ``dst_dir``.

    Symlinks are followed (HF cache snapshots are symlinks into ``blobs``) but must stay inside the folder or
    that cache; a file that escapes raises ``CheckpointError``. Returns the names copied.
    """
    src = Path(src_dir)
    if src.is_file():
        src = src.parent
    dst = Path(dst_dir)
    names = AUX_FILES + (("config.json",) if config else ())
    copied: list[str] = []
    for name in names:
        p = src / name
        if not os.path.lexists(p):
            continue
        resolve_inside(src, name, str(src), what="file")
        try:
            shutil.copyfile(p, dst / name)
        except OSError as e:
            raise OutputError(f"{dst / name}: cannot copy {name} from {src} ({e.strerror})") from None
        copied.append(name)
    return copied
