"""Putting a verified bundle in place so that a crash at any point leaves a whole list.

The new bundle is staged beside the old one (same directory, so same file system) in
`.NAME.update-*.tmp`, created 0600; written, fsynced, verified; then made 0644 (never
world-writable), renamed over the old name (atomic: a reader opens either the old or
the new file, whole) and the directory is fsynced so the rename survives a power
loss. A stage left by a killed updater is removed by the next run.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import IO

from netfilter.listfile import Bundle

__all__ = ["BUNDLE_MODE", "clean_stages", "manifest_digest", "place", "stage", "stage_prefix",
           "sync"]

BUNDLE_MODE = 0o644


def stage_prefix(target: Path) -> str:
    """The name every temporary file of an update of `target` starts with."""
    return f".{target.name}.update-"


def stage(target: Path) -> tuple[IO[bytes], Path]:
    """A new private file beside `target` for its next version (0600 until placed)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=stage_prefix(target), suffix=".tmp", dir=target.parent)
    return os.fdopen(fd, "wb"), Path(name)


def clean_stages(target: Path) -> list[Path]:
    """Remove stages a killed updater left beside `target`; returns what was removed.

    Call only while holding the update lock (another updater's stage is in use)."""
    removed = []
    if target.parent.is_dir():
        for path in target.parent.glob(stage_prefix(target) + "*.tmp"):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def sync(f: IO[bytes]) -> None:
    """The staged bytes on disk before anything may refer to them."""
    f.flush()
    os.fsync(f.fileno())


def place(staged: Path, target: Path) -> None:
    """Rename the verified stage over `target`, then make the rename durable."""
    os.chmod(staged, BUNDLE_MODE)
    os.replace(staged, target)
    fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def manifest_digest(bundle: Bundle) -> str:
    """SHA-256 (hex) of the signed manifest bytes: what identifies a version's content
    (the manifest names every member's SHA-256, so it stands for the whole bundle)."""
    return hashlib.sha256(bundle.manifest_bytes()).hexdigest()
