"""Output folders that appear only when complete.

A checkpoint or bundle is written into a hidden sibling folder and renamed into place at the
end, so the target is always the complete old folder, the complete new one, or absent; a run
that fails leaves neither a half-written folder nor the parent folders it created.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from pathlib import Path

from training.errors import OutputError

__all__ = ["OutputError", "check_replaceable", "replace_folder", "Staged"]

# What a folder must hold to be replaced: a bundle has its manifest, a checkpoint its meta.
BUNDLE_MARKER = "manifest.json"
CHECKPOINT_MARKER = "early_exit.json"
# Left in a checkpoint folder by a failed run of an earlier version: safe to replace.
CHECKPOINT_LEFTOVERS = {"train_log.jsonl", "tokenizer.json", "tokenizer"}


def check_replaceable(target: Path, marker: str, option: str, leftovers: set[str] = frozenset()) -> None:
    """Refuse to replace anything but an empty folder or one this tool wrote (it has `marker`)."""
    target = Path(target)
    if not target.exists():
        return
    if not target.is_dir():
        raise OutputError(f"{option} {target}: exists and is not a folder")
    entries = {p.name for p in target.iterdir()}
    if entries and marker not in entries and not entries <= set(leftovers):
        raise OutputError(f"{option} {target}: exists and is not an offramp "
                          f"{'bundle' if marker == BUNDLE_MARKER else 'checkpoint'} (no {marker}); "
                          f"refusing to replace it: choose another folder or remove it")


def replace_folder(staging: Path, target: Path) -> None:
    """Rename the complete `staging` folder to `target`, replacing an existing one."""
    staging, target = Path(staging), Path(target)
    if not target.exists():
        staging.rename(target)
        return
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    target.rename(old)
    try:
        staging.rename(target)
    except BaseException:
        old.rename(target)
        raise
    shutil.rmtree(old, ignore_errors=True)


class Staged:
    """`with Staged(target) as staging: ...write into staging.path...; staging.publish()`.

    Leaving the block without publish() (an exception) removes the staging folder and any
    parent folder it created."""

    def __init__(self, target: Path, scratch: bool = False):
        self.target = Path(target)
        self.path: Path | None = None
        self.published = False
        self.scratch = scratch  # a private temporary folder, never published (a process that
        self._created: list[Path] = []  # is not the main one of a distributed run writes nothing)

    def __enter__(self) -> Staged:
        if self.scratch:
            self.path = Path(tempfile.mkdtemp(prefix=f"offramp-{self.target.name}-"))
            return self
        missing, parent = [], self.target.parent
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self._created = missing  # deepest first
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.partial-", dir=self.target.parent))
        return self

    def publish(self) -> Path:
        if self.scratch:
            return self.target
        replace_folder(self.path, self.target)
        self.published = True
        return self.target

    def __exit__(self, *exc) -> None:
        if self.published and not self.scratch:
            return
        if self.path is not None and self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)
        for folder in self._created:
            try:
                folder.rmdir()  # only if empty
            except OSError:
                break
