"""Replace a file that a running proxy reads (models, forecast coefficients) atomically."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: Path, data: bytes, verify: Callable[[Path], None] | None = None) -> None:
    """Write `data` to `path` so readers see the old file or the new one, never a mix.

    The file gets the mode a plain open() would give it (0666 less the umask), not
    mkstemp's 0600: the proxy that reads a model may run as another user than the trainer.
    `verify(tmp)` checks the written file (as the proxy will load it) before it replaces
    anything; an exception leaves `path` as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~umask)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if verify is not None:
            verify(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
