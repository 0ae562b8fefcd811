"""A file whose reads fail while it stays as it is on disk (same mtime, size, inode, mode)."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

import pytest


class Unreadable:
    """Reads of `path` through Path.read_bytes fail with EACCES while `on`: what a mode-000
    file gives a proxy not running as root (root reads it, so tests cannot chmod)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
        self.path = path
        self.on = True
        real = Path.read_bytes

        def read_bytes(p: Path) -> bytes:
            if self.on and p == self.path:
                raise PermissionError(errno.EACCES, "Permission denied", str(p))
            return real(p)

        monkeypatch.setattr(Path, "read_bytes", read_bytes)


def mode_000_is_readable() -> bool:
    """Whether this process reads a file of mode 000 (root, or CAP_DAC_OVERRIDE, does)."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "f"
        path.write_bytes(b"x")
        path.chmod(0)
        try:
            with open(path, "rb"):
                return True
        except PermissionError:
            return False
        finally:
            os.chmod(path, 0o600)


CHMOD_NO_BAR = pytest.mark.skipif(mode_000_is_readable(), reason="this process reads a mode-000 "
                                  "file (root): the Unreadable test makes the read fail instead")
