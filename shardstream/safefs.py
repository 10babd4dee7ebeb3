"""The data dir is shared ground: open shardstream's own files there without following a planted link.

Every file shardstream writes in a data dir (partials; in .shardstream/ the sidecars, .lock/.lease,
status.json, events.jsonl: layout.py) is opened through `open_nofollow`: a symbolic link under that name is refused with an
`UnsafePathError` naming the path, never written through. `check_shard_name` refuses a directory or
other non-file under a shard's final name before anything is downloaded for it.
"""
import errno
import fcntl
import os
import stat

from . import layout
from .errors import UnsafePathError

NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def _refuse_link(path):
    return UnsafePathError(f"{path} is a symbolic link: shardstream never writes through one in its data dir. "
                           f"Remove it (rm {str(path)!r}) or choose another data dir")


def open_nofollow(path, flags, mode=0o644):
    """os.open(path, flags) that refuses (UnsafePathError) a symbolic link or anything but a regular file
    at path (a fifo planted there would block the open, a device would take our writes)."""
    try:
        fd = os.open(path, flags | NOFOLLOW | CLOEXEC | os.O_NONBLOCK, mode)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EMLINK) and os.path.islink(path):
            raise _refuse_link(path) from None
        if e.errno == errno.ENXIO:          # a fifo opened for writing with no reader
            raise _not_a_file(path, os.stat(path), "shardstream's own file") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _not_a_file(path, st, "shardstream's own file")
        if not flags & os.O_NONBLOCK:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def fopen_nofollow(path, mode="r", buffering=-1):
    """open(path, mode) for the modes "r", "w", "a" (text) and "rb", "wb", "ab", refusing a symbolic link."""
    base = mode.replace("b", "")
    flags = {"r": os.O_RDONLY, "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
             "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND}[base]
    fd = open_nofollow(path, flags)
    try:
        return os.fdopen(fd, mode, buffering)
    except BaseException:
        os.close(fd)
        raise


def ensure_book_dir(data_dir):
    """Create DIR/.shardstream (layout.py) if needed; UnsafePathError when something other than a real
    directory is there (a link to elsewhere would carry our writes out of the data dir)."""
    d = layout.book_dir(data_dir)
    try:
        os.mkdir(d, 0o755)
    except FileExistsError:
        st = os.lstat(d)
        if stat.S_ISLNK(st.st_mode):
            raise _refuse_link(d) from None
        if not stat.S_ISDIR(st.st_mode):
            raise UnsafePathError(f"{d} is not a directory, where shardstream keeps its bookkeeping: move it out "
                                  f"of the data dir (or choose another data dir)") from None
    return d


def check_own_file(path):
    """Raise UnsafePathError when something other than a regular file (a symbolic link, a directory, a
    fifo) sits at path, a name shardstream writes its own bookkeeping to; quiet when nothing is there."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise _refuse_link(path)
    if not stat.S_ISREG(st.st_mode):
        raise _not_a_file(path, st, "shardstream's own file")


def check_shard_name(path):
    """Raise UnsafePathError when a directory or other non-file sits under a shard's final name (a link
    to a regular file is a shard someone placed there, and is read like one)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):
        raise _not_a_file(path, st, "shard")


def _not_a_file(path, st, what):
    kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
    return UnsafePathError(f"{path} is {kind}, where the {what} belongs: move it out of the data dir (or choose "
                           f"another data dir); nothing was downloaded to it")
