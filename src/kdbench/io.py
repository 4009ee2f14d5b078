"""Atomic file writes: a reader never sees a half-written file.

Training state is written with a checksum (:func:`save_state`), and the previous state is kept
beside it until the new one is in place, so a damaged state is detected and the one before it
used (:func:`load_state_file`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import torch

from kdbench import faults
from kdbench.errors import KdbenchError

STATE_MAGIC = b"KDBENCH-STATE 1 sha256="


def _file_mode() -> int:
    """The mode a plainly created file gets (mkstemp's temporary files are 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


# read once: os.umask can only be read by setting it, which would race with other threads
FILE_MODE = _file_mode()


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike[str], keep_previous: str | os.PathLike[str] | None = None
) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    With ``keep_previous``, an existing ``path`` is first renamed to that name."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise KdbenchError(f"cannot write {path}: {exc.strerror or exc}") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, FILE_MODE)
        faults.point(f"write:{path.name}")
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
            faults.point(f"rotate:{path.name}")
        os.replace(tmp_path, path)
    except OSError as exc:  # a full disk or quota, a file too large: nothing half-written stays
        raise KdbenchError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        tmp_path.unlink(missing_ok=True)


def check_writable(*paths: str | os.PathLike[str]) -> None:
    """Fail now, in one line, if the directory of any of ``paths`` cannot take a new file
    (rather than after hours of training)."""
    for parent in dict.fromkeys(Path(p).parent for p in paths):
        try:
            parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=parent):
                pass
        except OSError as exc:
            raise KdbenchError(
                f"output directory {parent} is not writable: {exc.strerror or exc}"
            ) from None


def remove_stale_temps(*paths: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files that a killed writer of ``paths`` left behind."""
    removed = []
    for path in map(Path, paths):
        if path.parent.is_dir():
            for tmp in path.parent.glob(f".{path.name}.*.tmp"):
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    return removed


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def link_outputs(source: str | os.PathLike[str], outputs: list[str]) -> None:
    """Make each of ``outputs`` the file of its name in ``source`` (a cohort member's outputs,
    written by its cohort's job): a hard link where the file system allows one, else a copy,
    each put in place atomically and dated now (so that it is newer than the cohort's job)."""
    for out in map(Path, outputs):
        src = Path(source, out.name)
        if not src.is_file():
            raise KdbenchError(f"{src} is missing: its cohort's job did not write it")
        with atomic_path(out) as tmp:
            tmp.unlink()
            try:
                os.link(src, tmp)
            except OSError:
                shutil.copyfile(src, tmp)
            os.utime(tmp)


def read_json(path: str | os.PathLike[str]) -> Any:
    return json.loads(Path(path).read_text())


def save_torch(path: str | os.PathLike[str], obj: Any) -> None:
    """``torch.save`` atomically (tensors and plain containers only)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_torch(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` restricted to tensors and plain containers (no pickle of code)."""
    return torch.load(path, map_location=map_location, weights_only=True)


def previous_state(path: str | os.PathLike[str]) -> Path:
    """Where :func:`save_state` keeps the state before the latest one."""
    path = Path(path)
    return path.with_name(path.name + ".prev")


def save_state(path: str | os.PathLike[str], obj: Any) -> None:
    """Write training state with a checksum, atomically, keeping the previous state."""
    buf = BytesIO()
    torch.save(obj, buf)
    payload = buf.getvalue()
    digest = hashlib.sha256(payload).hexdigest().encode()
    with atomic_path(path, keep_previous=previous_state(path)) as tmp:
        tmp.write_bytes(STATE_MAGIC + digest + b"\n" + payload)


def load_state_file(path: str | os.PathLike[str]) -> Any:
    """Read a file written by :func:`save_state`; ValueError if it is damaged."""
    blob = Path(path).read_bytes()
    head, sep, payload = blob.partition(b"\n")
    if not sep or not head.startswith(STATE_MAGIC):
        raise ValueError("not a kdbench state file")
    if hashlib.sha256(payload).hexdigest().encode() != head[len(STATE_MAGIC) :]:
        raise ValueError("checksum mismatch (truncated or damaged)")
    return torch.load(BytesIO(payload), map_location="cpu", weights_only=True)


def remove_state(path: str | os.PathLike[str]) -> None:
    """Delete a finished run's state and the one kept before it."""
    Path(path).unlink(missing_ok=True)
    previous_state(path).unlink(missing_ok=True)
