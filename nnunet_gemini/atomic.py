"""Atomic file writes, used for every file a later run trusts (checkpoints, results, manifests,
splits): write a temporary file in the same folder, flush and fsync it, os.replace it over the
target, fsync the folder. A crash at any point leaves the previous file or the new one, never a
torn one.

Test-only fault injection: with GEMINI_TEST_ABORT_AFTER_TMP_WRITE=1 a write raises
WriteAborted right after the temporary file is written and synced (before the rename), which is
what a process killed while saving leaves behind.
"""
import json
import os
import tempfile
from typing import Any, BinaryIO, Callable

ABORT_AFTER_TMP_WRITE_ENV = "GEMINI_TEST_ABORT_AFTER_TMP_WRITE"
TMP_PREFIX = ".gemini_tmp_"


class WriteAborted(RuntimeError):
    """Raised only by the test-only fault injection."""


def fsync_dir(folder: str) -> None:
    # Makes the rename itself durable on POSIX; not possible (nor needed) on Windows.
    if os.name == "nt":
        return
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write(path: str, write: Callable[[BinaryIO], None], suffix: str = "") -> None:
    """write(f) into a temporary file beside `path`, then replace `path` with it."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=suffix, dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if os.environ.get(ABORT_AFTER_TMP_WRITE_ENV) == "1":
            # a real SIGKILL runs no finally block: leave the temporary file as a killed process would
            tmp_path_left, tmp_path = tmp_path, None
            raise WriteAborted(f"{ABORT_AFTER_TMP_WRITE_ENV}=1: aborted after writing {tmp_path_left}")
        os.replace(tmp_path, path)
        tmp_path = None
        fsync_dir(folder)
    finally:
        if tmp_path is not None and os.path.exists(tmp_path):
            os.remove(tmp_path)


def write_json_atomic(path: str, obj: Any, indent: int = 2) -> None:
    atomic_write(str(path), lambda f: f.write(json.dumps(obj, indent=indent).encode("utf-8")), suffix=".json")
