"""Writing files that must survive a crash: whole writes, fsynced files and folders, atomic swaps.

A file's bytes are only on disk once the file is fsynced, and a rename only once the folder
holding it is: whatever is acknowledged to a peer (a journaled result, a checkpoint) goes
through these first.
"""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h
EXCHANGE_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP}
"""Errors of :func:`exchange` where the system or filesystem cannot swap (then do without)."""


def write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is written: a write may take fewer bytes than offered."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def fsync_dir(folder: Path) -> None:
    """Force a folder's entries to disk: a rename or a new file in it is only durable once they are."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Force every file and folder under ``folder`` (and ``folder`` itself) to disk."""
    for root, _, files in os.walk(folder, topdown=False):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))


def exchange(a: Path, b: Path) -> None:
    """Swap two existing paths in one atomic step (Linux ``renameat2`` with ``RENAME_EXCHANGE``):
    no reader ever finds neither. OSError with an errno in ``EXCHANGE_UNSUPPORTED`` where the
    kernel, the C library or the filesystem (NFS, for one) cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not in this C library", str(a))
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(a), None, str(b))
