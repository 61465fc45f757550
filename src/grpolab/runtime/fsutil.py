"""Atomic outputs: a stage writes under a temporary name and renames when done, so a crash
or a bad input never leaves a half-written file or folder where a finished one is expected."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_output(path: str | Path, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` (a file or a folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    target = tmp if directory else tmp / path.name
    try:
        yield target
        if directory:
            old = path.with_name(f".{path.name}.old")  # is_temporary() knows these names
            shutil.rmtree(old, ignore_errors=True)
            if path.exists():
                os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(text)


OUTPUT_MARKER = ".grpolab-output"


def output_folder(path: str | Path, option: str) -> Path:
    """A folder the user named (`option`, e.g. `--out`) for a command's files, which are then written
    inside it one by one. Created and marked as grpolab's when missing or empty; reused when marked;
    refused when it holds anything else, so `--out data` or `--out ~` can never touch the user's files."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{option} {path}: a file, not a folder")
    if path.is_dir() and not (path / OUTPUT_MARKER).is_file() and any(path.iterdir()):
        raise FileExistsError(
            f"{option} {path}: the folder holds files grpolab did not write; name a new or empty folder"
        )
    path.mkdir(parents=True, exist_ok=True)
    (path / OUTPUT_MARKER).write_text("written by grpolab: its files here may be replaced by the next run\n")
    return path


def content_digest(paths: list[str | Path]) -> str:
    """sha256 over the names and bytes of every file under `paths` (files or folders, walked in sorted
    order): equal exactly when the content is."""
    digest = hashlib.sha256()
    for root in map(Path, paths):
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for path in files:
            digest.update(str(path.relative_to(root) if root.is_dir() else path.name).encode() + b"\0")
            with open(path, "rb") as f:
                digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()


def link_or_copy(source: Path, target: Path) -> None:
    """`target` becomes `source`'s content: a hard link where the filesystem allows, else a copy; atomic."""
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copy2(source, tmp)
    os.replace(tmp, target)


def take_lock(path: Path, busy: str):
    """An exclusive lock on `path` (created), which the kernel drops with the process, also on kill -9;
    the open file holds it. Raises FileExistsError(`busy`, with the holder's pid) when another has it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = open(path, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "?"
        lock.close()
        raise FileExistsError(f"{busy} (pid {holder})") from None
    lock.truncate(0)
    lock.write(str(os.getpid()))
    lock.flush()
    return lock


def is_temporary(path: Path) -> bool:
    """A file or folder that atomic_output or link_or_copy writes before renaming it into place."""
    return path.name.startswith(".") and path.name.endswith((".tmp", ".old"))
