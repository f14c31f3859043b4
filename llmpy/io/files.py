"""Helpers shared by every llm.c file format: the 256 x int32 header, and atomic writes."""
import json
import os
import tempfile

import numpy as np

from ..errors import LlmpyError

HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4


def article(noun):
    """The noun with its indefinite article: "an eval", "a model"."""
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def file_size(path, kind=None):
    """The size of a file; one line for a missing file, a directory (kind: what the file should
    be, for the message) or an unreadable one."""
    if os.path.isdir(path):
        raise LlmpyError(f"{path}: is a directory, not " +
                         (f"an llm.c {kind} file" if kind else "a file"))
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        raise LlmpyError(f"{path}: no such file") from None
    except OSError as e:
        raise LlmpyError(f"{path}: cannot read: {e.strerror}") from None


def read_header(path, magic, versions, kind):
    """Read and validate an llm.c header. Returns the 256 int32 values."""
    if file_size(path, kind) < HEADER_BYTES:
        raise LlmpyError(f"{path}: truncated {kind} file (smaller than its {HEADER_BYTES}-byte header)")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != magic:
        raise LlmpyError(f"{path}: bad magic number {header[0]} ({article(kind)} file starts with {magic})")
    if header[1] not in versions:
        raise LlmpyError(f"{path}: unsupported {kind} version {header[1]} "
                         f"(supported: {', '.join(map(str, versions))})")
    return header


def ensure_dir(path, what="output directory"):
    """Create a directory (and its parents), or fail in one line, before any work is done."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise LlmpyError(f"{path}: is a file, not a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise LlmpyError(f"{path}: cannot create the {what}: {e.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise LlmpyError(f"{path}: {what} is not writable")
    return path


def check_output_file(path):
    """Fail in one line, before any work is done, where the file cannot be written: its
    directory is missing or read-only, or a directory stands in its place."""
    d = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise LlmpyError(f"{path}: is a directory, not a file")
    if not os.path.isdir(d):
        raise LlmpyError(f"{path}: no such directory {d}")
    if not os.access(d, os.W_OK | os.X_OK):
        raise LlmpyError(f"{path}: the directory {d} is not writable")
    return path


def make_header(magic, version, *values):
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1] = magic, version
    header[2:2 + len(values)] = values
    return header


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path, arrays):
    """Write the arrays' bytes to path via a temporary file, fsync and rename, so a crash at
    any moment leaves either the old file or the complete new one."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=d, prefix=os.path.basename(path) + ".", suffix=".tmp")
    except OSError as e:
        raise LlmpyError(f"{path}: cannot write: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            for a in arrays:
                f.write(memoryview(np.ascontiguousarray(a)).cast("B"))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())       # mkstemp makes 0600; the usual mode
        os.replace(tmp, path)
    except OSError as e:                      # disk full, path is a directory, ...
        os.unlink(tmp)
        raise LlmpyError(f"{path}: cannot write: {e.strerror}") from None
    except BaseException:
        os.unlink(tmp)
        raise


def write_json(path, obj):
    """obj as JSON in path, written atomically."""
    atomic_write(path, [np.frombuffer(json.dumps(obj, indent=1).encode(), dtype=np.uint8)])
