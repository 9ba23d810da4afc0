"""Durable local files: an acknowledged write survives ``kill -9`` and a power cut.

A file is durable once its bytes are fsynced and the directory entry that names it is fsynced too;
``os.replace``/``os.rename`` alone only makes the switch atomic. The feedback store's images and
the local artifact store both write this way.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: str | Path) -> None:
    """Flush a directory's entries (the names of files created or renamed in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """Flush every file under ``root`` and then every directory's entries, ``root``'s included."""
    root = Path(root)
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    for directory in [root, *[p for p in root.rglob("*") if p.is_dir()]]:
        fsync_dir(directory)
