"""Atomic file writes: a reader never sees a half-written file.

Training state is written with a checksum (:func:`save_state`), and the previous state is kept
beside it until the new one is in place, so a damaged state is detected and the one before it
used (:func:`load_state_file`). Its tensors are packed into one buffer (:func:`pack_tensors`),
and :class:`StateWriter` writes it while training goes on.

The functions that read or write tensors import torch when called, so that the jobs that only
write tables, plots or links start without it (about 2 s).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdbench import faults
from kdbench.errors import KdbenchError

if TYPE_CHECKING:
    import torch

STATE_MAGIC = b"KDBENCH-STATE 1 sha256="
_PACKED = "__kdbench_packed__"  # marks a state whose tensors are packed (pack_tensors)
_TENSOR = "__kdbench_tensor__"  # marks a packed tensor's place in the state


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
    _write_text(path, _json_text(data))


def _json_text(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=False) + "\n"


def _write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


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
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_torch(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` restricted to tensors and plain containers (no pickle of code)."""
    import torch

    return torch.load(path, map_location=map_location, weights_only=True)


def previous_state(path: str | os.PathLike[str]) -> Path:
    """Where :func:`save_state` keeps the state before the latest one."""
    path = Path(path)
    return path.with_name(path.name + ".prev")


def pack_tensors(obj: Any) -> dict[str, Any]:
    """``obj`` (dicts, lists and tuples of tensors and plain values) as a copy whose tensors are
    packed into one byte tensor on the CPU, a snapshot that later changes to ``obj``'s tensors do
    not reach. A training state holds thousands of small tensors (8 ResNet56 students' weights,
    momenta and best weights: 6,888 in 80 MB), which ``torch.save`` writes as a record each and
    which would each be copied from the GPU on their own; packed, one copy per device and one
    record. :func:`unpack_tensors` undoes it."""
    import torch

    tensors: list[torch.Tensor] = []

    def walk(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            tensors.append(x.detach())
            return {_TENSOR: len(tensors) - 1}
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return type(x)(walk(v) for v in x)
        return x

    tree = walk(obj)
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    parts, layout, offset = [], [None] * len(tensors), 0
    for indices in by_device.values():
        flat = [tensors[i].contiguous().reshape(-1).view(torch.uint8) for i in indices]
        parts.append(torch.cat(flat).cpu())  # a copy: from the GPU, or a new buffer on the CPU
        for i, f in zip(indices, flat, strict=True):
            dtype = str(tensors[i].dtype).removeprefix("torch.")
            layout[i] = [dtype, list(tensors[i].shape), offset, f.numel()]
            offset += f.numel()
    blob = parts[0] if len(parts) == 1 else torch.cat([torch.empty(0, dtype=torch.uint8), *parts])
    return {_PACKED: 1, "tree": tree, "tensors": layout, "blob": blob}


def unpack_tensors(packed: dict[str, Any]) -> Any:
    """The object that :func:`pack_tensors` packed, each tensor in a storage of its own."""
    import torch

    blob = packed["blob"]
    tensors = [
        blob[offset : offset + size].clone().view(getattr(torch, dtype)).reshape(shape)
        for dtype, shape, offset, size in packed["tensors"]
    ]

    def walk(x: Any) -> Any:
        if isinstance(x, dict):
            return tensors[x[_TENSOR]] if _TENSOR in x else {k: walk(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return type(x)(walk(v) for v in x)
        return x

    return walk(packed["tree"])


def write_state_file(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as it is as a state file: ``torch.save``, the checksum, atomically, keeping
    the previous state (:func:`save_state` packs it first)."""
    import torch

    buf = BytesIO()
    torch.save(obj, buf)
    payload = buf.getbuffer()
    digest = hashlib.sha256(payload).hexdigest().encode()
    with atomic_path(path, keep_previous=previous_state(path)) as tmp, open(tmp, "wb") as fh:
        fh.write(STATE_MAGIC + digest + b"\n")
        fh.write(payload)


def save_state(path: str | os.PathLike[str], obj: Any) -> None:
    """Write training state with a checksum, atomically, keeping the previous state."""
    write_state_file(path, pack_tensors(obj))


class StateWriter:
    """:func:`save_state` in a background thread, for a training loop: :meth:`save` takes the
    snapshot (:func:`pack_tensors`) and returns while the state is serialised, checksummed,
    written, synced to disk and renamed into place (for 8 ResNet56 students on 2 cores the loop
    waits 0.09 s for the snapshot, and the write then takes 0.26 s; ``bench state``). The next
    :meth:`save` and :meth:`close` wait for that write and raise its error. Use as a context
    manager: leaving it waits for the last write, so the state a run stops with is on disk."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kdbench-state")
        self._pending: Future[None] | None = None

    def save(
        self,
        path: str | os.PathLike[str],
        obj: Any,
        then_json: Sequence[tuple[str | os.PathLike[str], Any]] = (),
    ) -> None:
        """Save ``obj`` as the state at ``path``, then write each (path, document) of
        ``then_json`` as :func:`write_json` does (the documents as they are now): a run's
        metrics.json never shows an epoch whose state is not on disk."""
        self.wait()
        packed, phase = pack_tensors(obj), faults.current_phase()
        texts = [(p, _json_text(doc)) for p, doc in then_json]

        def write() -> None:
            with faults.in_phase(phase):  # its kill points: the epoch it was saved in
                write_state_file(path, packed)
                for p, text in texts:
                    _write_text(p, text)

        self._pending = self._pool.submit(write)

    def wait(self) -> None:
        """Until the last state saved is on disk (its write's error, if it failed). Interrupted
        (SIGINT, or SIGTERM under ``errors.sigterm_raises``), it still waits at :meth:`close`."""
        pending = self._pending
        if pending is None:
            return
        try:
            pending.result()
        finally:
            if pending.done():  # written, or failed and raised here: not raised again
                self._pending = None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown()

    def __enter__(self) -> StateWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # the run stops on an error: its last state still lands, the error stays the one
            self.close()
        except Exception as write_error:  # noqa: BLE001 - reported, not raised over exc
            exc.add_note(f"the last training state was not written: {write_error}")


def load_state_file(path: str | os.PathLike[str]) -> Any:
    """Read a file written by :func:`save_state` (or by kdbench before its tensors were
    packed); ValueError if it is damaged."""
    import torch

    blob = Path(path).read_bytes()
    head, sep, payload = blob.partition(b"\n")
    if not sep or not head.startswith(STATE_MAGIC):
        raise ValueError("not a kdbench state file")
    if hashlib.sha256(payload).hexdigest().encode() != head[len(STATE_MAGIC) :]:
        raise ValueError("checksum mismatch (truncated or damaged)")
    state = torch.load(BytesIO(payload), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and state.get(_PACKED) == 1:
        return unpack_tensors(state)
    return state


def remove_state(path: str | os.PathLike[str]) -> None:
    """Delete a finished run's state and the one kept before it."""
    Path(path).unlink(missing_ok=True)
    previous_state(path).unlink(missing_ok=True)
