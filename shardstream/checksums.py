"""Checksum files: a `SHA256SUMS` beside the shards gives their sha256 when the source's headers do not.

The Hub sends each shard's sha256 (X-Linked-Etag) and object stores list theirs, but a plain https mirror
usually sends neither. Such a mirror can publish what `sha256sum shard_*.parquet > SHA256SUMS` writes (or
`sha256sum --tag`'s BSD form) at its base URL; fetch.py then verifies every shard against it.

The file is read once per process and base URL (fetch.py does the GET, with the same redirect and token
rules as a shard). It is untrusted input like everything a server sends: a reply over 16 MiB is not a
checksum file (fetch.py stops reading and ignores it); a line
that is neither form among valid ones, or a name listed twice with two sums, makes the whole file an
error naming its URL and line; names with a folder in them are not ours and are ignored. An absent file
(404) is no error, nor is a reply with no checksum line at all (a server that answers every path with
the same page): the shards are then checked by size and parquet footer only, as before. Nor does a file
that cannot be read just now (5xx, a dropped connection) hold a download up: the shard at hand goes on
without it, and the file is asked for again 30 s later.
"""
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

CHECKSUM_FILE = "SHA256SUMS"        # FetchPolicy.checksum_file's default
MAX_CHECKSUM_FILE_BYTES = 16 << 20  # ~190,000 lines of sha256sum output; a larger reply is not one

_GNU_LINE = re.compile(r"^\\?([0-9a-fA-F]{64}) [ *](.+)$")          # "<hex>  name", "<hex> *name"
_BSD_LINE = re.compile(r"^SHA256 \((.+)\) = ([0-9a-fA-F]{64})$")      # sha256sum --tag


class ChecksumFileError(ValueError):
    """A checksum file that cannot be trusted as written (malformed, contradictory, too large)."""


class NotAChecksumFile(ChecksumFileError):
    """What the server sent under the checksum file's name has no checksum line at all."""


class ChecksumFileUnavailable(Exception):
    """The checksum file could not be read just now (5xx, 429, a dropped connection): try again later."""


@dataclass(frozen=True)
class ChecksumFile:
    """The sums one checksum file lists: {file name: lower-case hex sha256}."""
    url: str                                    # where it was read (redacted: safe to print)
    sums: dict = field(default_factory=dict, repr=False)

    def sha256(self, name):
        return self.sums.get(name)


def parse_sha256sums(text, url):
    """The ChecksumFile of `text` read from `url`. Raises ChecksumFileError naming the URL and the line."""
    sums, bad = {}, None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        gnu, bsd = _GNU_LINE.match(line), _BSD_LINE.match(line)
        if gnu:
            digest, name = gnu.group(1), gnu.group(2)
        elif bsd:
            name, digest = bsd.group(1), bsd.group(2)
        else:
            bad = bad or (lineno, line)
            continue
        name = name[2:] if name.startswith("./") else name
        if "/" in name or "\\" in name:
            continue                            # another folder's file: not a shard at this base URL
        digest = digest.lower()
        if sums.get(name, digest) != digest:
            raise ChecksumFileError(f"{url} lists {name} twice with two different sha256 sums (line {lineno}): "
                                    f"fix the file")
        sums[name] = digest
    if bad is not None:
        lineno, line = bad
        what = f"{url} line {lineno} is not a sha256sum line ('<64 hex digits>  <file name>' or " \
               f"'SHA256 (<file name>) = <64 hex digits>'): {line[:80]!r}"
        if not sums:
            raise NotAChecksumFile(f"{what}, nor is any other: not a checksum file")
        raise ChecksumFileError(f"{what}. Fix or remove the file (shards are then checked by size and parquet "
                                f"footer only)")
    return ChecksumFile(url, sums)


class ChecksumCache:
    """Checksum files read so far in this process, by base URL: read once, by one thread at a time.

    get(base_url, load): load() returns (url, text) of the file, or None when the source has none. A
    malformed file is remembered as its error, raised again on every get; a reply with no checksum line at
    all counts as no file. When load() raises ChecksumFileUnavailable the shard at hand goes without
    (get returns None, with a warning) and the file is asked for again `retry_seconds` later: an optional
    file never holds a download up, and a blip does not turn the check off for the whole run.
    """

    def __init__(self, retry_seconds=30.0):
        self.retry_seconds = retry_seconds
        self._lock = threading.Lock()
        self._locks = {}
        self._files = {}        # base_url -> ChecksumFile | None | ChecksumFileError
        self._retry_at = {}     # base_url -> monotonic time before which an unavailable file is not asked for

    def get(self, base_url, load):
        with self._lock:
            lock = self._locks.setdefault(base_url, threading.Lock())
        with lock:
            if base_url not in self._files:
                if time.monotonic() < self._retry_at.get(base_url, 0.0):
                    return None
                try:
                    got = load()
                except ChecksumFileUnavailable as e:
                    self._retry_at[base_url] = time.monotonic() + self.retry_seconds
                    logger.warning("%s; this shard is checked by size and parquet footer only, the file is asked "
                                   "for again in %.0f s", e, self.retry_seconds)
                    return None
                try:
                    self._files[base_url] = None if got is None else parse_sha256sums(text=got[1], url=got[0])
                except NotAChecksumFile as e:
                    logger.warning("ignoring %s; shards are checked by size and parquet footer only", e)
                    self._files[base_url] = None
                except ChecksumFileError as e:
                    self._files[base_url] = e
            found = self._files[base_url]
        if isinstance(found, ChecksumFileError):
            raise found
        return found

    def forget(self, base_url=None):
        """Read the file(s) again on the next get (all base URLs when None)."""
        with self._lock:
            if base_url is None:
                self._files.clear()
                self._retry_at.clear()
            else:
                self._files.pop(base_url, None)
                self._retry_at.pop(base_url, None)


CHECKSUMS = ChecksumCache()


def write_sha256sums(directory, paths):
    """Write directory/SHA256SUMS listing paths (files in directory), as `sha256sum` would; returns its path."""
    from .verify import sha256_file
    lines = [f"{sha256_file(p)}  {Path(p).name}\n" for p in sorted(paths, key=lambda p: Path(p).name)]
    out = Path(directory) / CHECKSUM_FILE
    tmp = out.with_name(f".{CHECKSUM_FILE}.tmp")
    tmp.write_text("".join(lines))
    os.replace(tmp, out)
    return out
