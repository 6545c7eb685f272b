"""Writing outputs atomically: a temporary file beside the target, then one rename.

A reader never sees a half-written file, an interrupted or failed write leaves nothing behind,
and the result gets the permissions of a file created the usual way (``0o666`` less the umask;
``tempfile`` would leave ``0o600``). Every ``OSError`` becomes a one-line error naming the path.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, BinaryIO

from qfx_onnx.errors import OutputError, QfxError


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_parent(path: Path, what: str, error: type[QfxError] = OutputError) -> None:
    """Raise ``error`` unless ``path``'s folder exists and is a folder."""
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise error(f"{path}: cannot write the {what}: the folder {parent} does not exist")


def write_atomic(path: str | os.PathLike, content: bytes | str | Callable[[BinaryIO], None], *, what: str = "file",
                 error: type[QfxError] = OutputError) -> Path:
    """Write ``content`` (bytes, text as UTF-8, or a function writing to a binary handle) to
    ``path`` atomically; returns the path. Raises ``error`` (an OutputError by default) naming the
    path and the reason when the folder is missing or not writable; never leaves a temp file."""
    path = Path(path)
    check_parent(path, what, error)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent if str(path.parent) else ".")
    except OSError as exc:
        raise error(f"{path}: cannot write the {what} ({exc.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            if callable(content):
                content(handle)
            else:
                handle.write(content.encode("utf-8") if isinstance(content, str) else content)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise error(f"{path}: cannot write the {what} ({exc.strerror})") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
