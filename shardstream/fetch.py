"""One shard from a source to disk, never wrong: the transfer layer every downloader calls.

    result = fetch_shard(source, 7, "/data", FetchPolicy(), stop=stop_event, on_bytes=bar.update)

How a fetch goes:
1. If `shard_00007.parquet` is there it is done (a file under its final name is always verified).
2. Take the per-shard lock `shard_00007.parquet.lock` (filelock), so two processes never fetch the same
   shard at once: the second waits, then finds the final file.
3. HEAD the URL without following redirects: size (X-Linked-Size, else Content-Length), sha256
   (X-Linked-Etag), ETag. A partial file from an earlier try (`shard_00007.parquet.<unique>.partial`, with
   a `.partial.json` sidecar recording the size/sha256/etag it belongs to) is resumed when the sidecar
   matches, else deleted.
4. GET with `Range: bytes=<have>-`, streaming 1 MiB chunks into the partial file and into a sha256.
   Redirects are followed by hand: only to http(s), and the bearer token only to its own host. A dropped
   connection, a stall (no byte for stall_timeout), 5xx or 429 is retried with exponential backoff and full
   jitter (Retry-After honoured), continuing from the bytes already written. A server that ignores Range
   (200 instead of 206) is restarted cleanly from byte 0.
5. Verify: byte count == size, sha256 == X-Linked-Etag, parquet footer with a `text` column. A bad file is
   deleted and fetched again; a size/sha256 that never matches becomes PermanentFetchError.
6. fsync the file, rename it to its final name, fsync the directory.

Errors name the shard, the URL without secrets, attempts and cause, and never the token.

Sources of kind s3/gs/file (source.py) take the same path with objectstore.ObjectTransfer: a stat through
fsspec instead of the HEAD, ranged reads instead of the GET; partial files, retries, verify and commit are
the ones here. For every kind, what the source says is held against the listing the Source was pinned to
(Source.check_pinned): a shard that changed since the run started is a PermanentFetchError.
"""
import ctypes
import errno
import hashlib
import http.client
import json
import logging
import os
import queue
import random
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass, replace
from email.utils import parsedate_to_datetime
from pathlib import Path
from urllib.parse import urljoin

import filelock
import requests
import urllib3

from .errors import (ConfigError, CorruptShardError, DiskSpaceError, FetchCancelled, PermanentFetchError,
                     TransientFetchError)
from .checksums import (CHECKSUM_FILE, CHECKSUMS, MAX_CHECKSUM_FILE_BYTES, ChecksumFileError,
                        ChecksumFileUnavailable)
from .errors import UnsafePathError
from .safefs import check_own_file, check_shard_name, fopen_nofollow, open_nofollow
from .shards import shard_name
from .source import OBJECT_STORE_KINDS, RemoteInfo, follow_problem, redact_url
from .verify import check_parquet, decode_parquet, sha256_file, verify_shard

logger = logging.getLogger(__name__)

MAX_REDIRECTS = 10
LOCK_POLL = 0.25            # seconds between checks of `stop` while waiting for another fetcher's lock
WATCH_POLL = 0.1            # seconds between checks of `stop` while a transfer is in flight
SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
VERIFY_LEVELS = ("footer", "decode")
BYTES_REPORT = 256 << 10    # call on_bytes at least every this many bytes received...
BYTES_REPORT_SECONDS = 0.5  # ...or this often, so a slow transfer's progress shows
# What a dropped, reset, stalled or garbled connection raises somewhere between requests and the socket.
NETWORK_ERRORS = (OSError, http.client.HTTPException, requests.RequestException, urllib3.exceptions.HTTPError)


@dataclass(frozen=True)
class FetchPolicy:
    """How hard and how long fetch_shard tries."""
    connect_timeout: float = 10.0     # seconds to open a connection
    stall_timeout: float = 30.0       # seconds without a byte before a transfer is abandoned and resumed
    max_attempts: int | None = 10     # failed tries in a row without progress; None = retry forever
    backoff_initial: float = 0.5      # exponential backoff with full jitter, capped at backoff_max
    backoff_max: float = 30.0
    chunk_bytes: int = 1 << 20
    max_shard_bytes: int = 4 << 30    # refuse a body larger than this
    verify_parquet: bool = True
    max_full_downloads: int = 3       # complete downloads that fail verification before giving up
    retry_after_max: float = 300.0    # longest Retry-After honoured (seconds)
    fsync: bool = True                # fsync file + dir before/after the rename. False: faster on slow
                                      # disks, but a machine crash (not a process kill) may then leave a
                                      # final-named file incomplete. For benchmarks and scratch dirs.
    checksum_file: str | None = CHECKSUM_FILE   # read at an http(s) base URL whose shards come without a
                                      # sha256 (checksums.py); None: never look for one
    require_checksum: bool = False    # refuse (PermanentFetchError) a shard the source gives no sha256/md5 for
    verify: str = "footer"            # "footer": size, checksum when there is one, parquet footer;
                                      # "decode": also read and decompress every page before the commit
    low_speed_limit: int = 1024       # bytes/s: a transfer slower than this for low_speed_time seconds is
    low_speed_time: float = 30.0      # abandoned and resumed on a new connection (curl's --speed-limit /
                                      # --speed-time); a trickle counts as a failed try. 0: off

    def __post_init__(self):
        for name in ("connect_timeout", "stall_timeout", "backoff_max", "retry_after_max"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"FetchPolicy.{name} must be > 0, got {getattr(self, name)!r}")
        if self.backoff_initial < 0:
            raise ConfigError(f"FetchPolicy.backoff_initial must be >= 0, got {self.backoff_initial!r}")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ConfigError(f"FetchPolicy.max_attempts must be >= 1 or None, got {self.max_attempts!r}")
        if self.checksum_file is not None and (not self.checksum_file or "/" in self.checksum_file
                                               or self.checksum_file in (".", "..")):
            raise ConfigError(f"FetchPolicy.checksum_file must be a file name at the source's base URL (like "
                              f"{CHECKSUM_FILE!r}) or None, got {self.checksum_file!r}")
        if self.verify not in VERIFY_LEVELS:
            raise ConfigError(f"FetchPolicy.verify must be one of {', '.join(VERIFY_LEVELS)}, got {self.verify!r}")
        if not (self.low_speed_time >= 0 and self.low_speed_limit >= 0):
            raise ConfigError(f"FetchPolicy.low_speed_limit and low_speed_time must be >= 0 (0 turns the "
                              f"low-speed rule off), got {self.low_speed_limit!r} and {self.low_speed_time!r}")
        if self.chunk_bytes < 4096 or self.max_shard_bytes < 1 or self.max_full_downloads < 1:
            raise ConfigError("FetchPolicy: chunk_bytes must be >= 4096, max_shard_bytes and "
                              "max_full_downloads >= 1")


@dataclass(frozen=True)
class FetchResult:
    """A shard verified on disk under its final name."""
    shard_id: int
    path: Path
    size: int
    sha256: str | None              # the file's sha256 (verified against the source's when it gave one);
                                    # None when the file was already there (not re-hashed)
    bytes_downloaded: int           # bytes received over the network by this call
    attempts: int                   # requests tried (HEAD + GET), 0 when the file was already there
    seconds: float
    resumed_from: int               # bytes of an earlier partial file this call continued from
    already_present: bool = False   # the final file was there; nothing was fetched
    checked: str | None = None      # what vouched for the bytes: "sha256", "md5" or "size+footer" (the
                                    # source gave no checksum), "+decode" when every page was read too;
                                    # None when the file was already there


# -----------------------------------------------------------------------------
# Internal outcomes of one try (turned into the public errors, with shard/URL, at the top)

class _Retry(Exception):
    """This try failed in a way worth retrying."""

    def __init__(self, cause, retry_after=None, progressed=False):
        super().__init__(cause)
        self.cause, self.retry_after, self.progressed = cause, retry_after, progressed


class _Fatal(Exception):
    """This try failed in a way retrying cannot fix."""


class _Corrupt(Exception):
    """A complete download failed verification."""


def _scrub(text, token=None):
    """Error text safe to show: no token, no query strings (signed CDN URLs carry secrets there)."""
    text = str(text)
    if token:
        text = text.replace(token, "<redacted>")
    return re.sub(r"(https?://[^\s'\"?]*)\?[^\s'\"]*", r"\1?<redacted>", text)


def _describe(e, token=None):
    return _scrub(f"{type(e).__name__}: {e}", token)


# -----------------------------------------------------------------------------
# HTTP: requests with redirects followed by hand

def _redirect_target(source, url, location):
    """Where a redirect may go (source.follow_problem): http(s) only, well-formed, and plain http only to
    loopback unless allowed."""
    try:
        target = urljoin(url, location)
    except ValueError:
        target = location
    why = follow_problem(target, source.allow_insecure)
    if why:
        raise _Fatal(f"refused a redirect to {why}")
    return target


def _request(session, source, method, url, policy, headers=None, follow=True):
    """One request, following up to MAX_REDIRECTS redirects by hand when follow is set (so the bearer
    token is sent only to its host, and only http(s) targets are followed). Returns (first, last)
    responses; first is closed unless it is last."""
    first = None
    try:
        for _ in range(MAX_REDIRECTS + 1):
            h = {"Accept-Encoding": "identity", **(headers or {}), **source.headers_for(url)}
            try:
                resp = session.request(method, url, headers=h, allow_redirects=False, stream=True,
                                       timeout=(policy.connect_timeout, policy.stall_timeout))
            except ValueError as e:     # requests parses a Location even when it does not follow it
                if isinstance(e, requests.RequestException):
                    raise
                raise _Fatal(f"refused a redirect to a malformed URL ({e})") from None
            if first is None:
                first = resp
            if not (follow and resp.is_redirect and "Location" in resp.headers):
                return first, resp
            url = _redirect_target(source, url, resp.headers["Location"])
            if resp is not first:
                resp.close()
        raise _Fatal(f"more than {MAX_REDIRECTS} redirects")
    except BaseException:
        if first is not None:
            first.close()
        raise


def _retry_after(resp):
    value = resp.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _check_status(resp):
    """Raise _Fatal / _Retry for an error status; return for 2xx."""
    code = resp.status_code
    if 200 <= code < 300:
        return
    what = f"HTTP {code} {resp.reason or ''}".strip()
    if code in (404, 410):
        raise _Fatal(f"{what}: the shard does not exist at this source")
    if code in (401, 403):
        raise _Fatal(f"{what}: not authorized (for a gated repo set HF_TOKEN to a token that has access)")
    if code == 429 or code == 408 or code >= 500:
        raise _Retry(what, retry_after=_retry_after(resp))
    if 300 <= code < 400:
        raise _Fatal(f"{what}: redirect without a usable Location")
    raise _Fatal(what)


def _validator(info):
    """What an If-Range may carry for info: its strong ETag, else its Last-Modified, else None."""
    if info.etag and not info.etag.startswith("W/"):
        return info.etag
    return info.last_modified or None


def _changed_validator(info, resp):
    """Why resp is not a piece of the file info describes (its ETag or Last-Modified differs), or None."""
    for what, ours in (("ETag", info.etag), ("Last-Modified", info.last_modified)):
        theirs = resp.headers.get(what)
        if ours and theirs and theirs != ours:
            return f"the server's {what} is now {theirs}, not {ours}: the file changed"
    return None


def _parse_sha256(value):
    if not value:
        return None
    value = value.strip()
    if value.startswith("W/"):
        value = value[2:]
    value = value.strip('"')
    return value.lower() if SHA256_RE.match(value) else None


def _head(source, url, policy, session):
    """HEAD without following the first redirect (the Hub puts X-Linked-* on it); follow on only when
    the size is not there yet."""
    first, last = None, None
    try:
        first, _ = _request(session, source, "HEAD", url, policy, follow=False)
        last = first
        if first.is_redirect and "X-Linked-Size" not in first.headers and "Location" in first.headers:
            _, last = _request(session, source, "HEAD",
                               _redirect_target(source, url, first.headers["Location"]), policy)
        if not (first.is_redirect and "X-Linked-Size" in first.headers):    # that one is the Hub's answer
            _check_status(last)
        size = first.headers.get("X-Linked-Size") or last.headers.get("X-Linked-Size") \
            or (last.headers.get("Content-Length") if last.status_code == 200 else None)
        try:
            size = int(size) if size is not None else None
        except ValueError:
            size = None
        if size is not None and size < 0:
            size = None
        sha = _parse_sha256(first.headers.get("X-Linked-Etag") or last.headers.get("X-Linked-Etag"))
        # The Hub's own answer carries the file's ETag; behind any other redirect, the file's server does.
        etag = (first if first is last or "X-Linked-Size" in first.headers else last).headers.get("ETag")
        return RemoteInfo(size=size, sha256=sha, etag=etag, last_modified=last.headers.get("Last-Modified"))
    finally:
        for r in {id(r): r for r in (first, last) if r is not None}.values():
            r.close()


def _probe(source, shard_id, url, policy, session):
    """What the source says about one shard now: a HEAD for http(s) and the Hub, a stat through fsspec
    for s3/gs/local (objectstore.py). Held against the listing the source was pinned to: a shard that
    changed since is a _Fatal naming what changed."""
    if source.kind in OBJECT_STORE_KINDS:
        from .objectstore import stat_shard
        info = stat_shard(source, shard_id)
    else:
        info = _head(source, url, policy, session)
    info, changed = source.check_pinned(shard_id, info)
    if changed:
        raise _Fatal(changed)
    if info.sha256 is None and source.kind not in OBJECT_STORE_KINDS and policy.checksum_file:
        try:
            sums = CHECKSUMS.get(source.base_url, lambda: _load_checksum_file(source, policy, session))
        except ChecksumFileError as e:
            raise _Fatal(f"{e}; or skip the check with FetchPolicy(checksum_file=None)") from None
        sha = sums.sha256(shard_name(shard_id)) if sums is not None else None
        if sha is not None:
            info = replace(info, sha256=sha, sha256_from=sums.url)
    if info.sha256 is None and info.md5 is None:
        _no_checksum(source, policy)
    return info


_warned_no_checksum = set()
_warned_lock = threading.Lock()


def _no_checksum(source, policy):
    """A shard the source gives no checksum for: refused under require_checksum, else said once per source
    (at WARNING for a network source; a local folder's bytes cross no network)."""
    how = ("publish a SHA256SUMS next to the shards (sha256sum shard_*.parquet > SHA256SUMS) or use hf://"
           if source.kind == "http" else
           "for S3 upload without multipart (so the ETag is the MD5) or use hf://" if source.kind == "s3" else
           "use a source that lists a checksum (hf://, gs://, a SHA256SUMS at an https mirror)")
    if policy.require_checksum:
        raise _Fatal(f"the source gives no sha256 or md5 for this shard and a checksum is required "
                     f"(--require-checksum / SHARDSTREAM_REQUIRE_CHECKSUM / FetchPolicy.require_checksum): {how}")
    with _warned_lock:
        if source.name in _warned_no_checksum:
            return
        _warned_no_checksum.add(source.name)
    logger.log(logging.INFO if source.kind == "file" else logging.WARNING,
               "%s gives no checksum for its shards: each is checked by its size and parquet footer only, "
               "which cannot catch a flipped byte inside a data page. To verify every byte, %s; to refuse "
               "such shards, set require_checksum (--require-checksum)", redact_url(source.name), how)


def _load_checksum_file(source, policy, session):
    """(redacted url, text) of the checksum file at source's base URL, or None when it has none (a 4xx,
    or a reply too large to be one). 5xx, 429, a refused redirect or a dropped connection raise
    ChecksumFileUnavailable: the shard goes on without, and the file is asked for again later."""
    url = f"{source.base_url.rstrip('/')}/{policy.checksum_file}"
    try:
        return _read_checksum_file(source, url, policy, session)
    except _Retry as e:
        cause = e.cause
    except _Fatal as e:
        cause = str(e)
    except NETWORK_ERRORS as e:
        cause = _describe(e, source.token)
    raise ChecksumFileUnavailable(f"cannot read {redact_url(url)} now ({cause})")


def _read_checksum_file(source, url, policy, session):
    first, last = _request(session, source, "GET", url, policy)
    try:
        code = last.status_code
        if 400 <= code < 500 and code not in (408, 429):
            logger.debug("no checksum file at %s (HTTP %d)", redact_url(url), code)
            return None
        _check_status(last)
        data = bytearray()
        for chunk in last.iter_content(1 << 16):
            data += chunk
            if len(data) > MAX_CHECKSUM_FILE_BYTES:     # what answers there is not a checksum file
                logger.warning("ignoring %s: over %d bytes, not a checksum file; shards are checked by size "
                               "and parquet footer only", redact_url(url), MAX_CHECKSUM_FILE_BYTES)
                return None
        logger.info("verifying shards against %s", redact_url(url))
        return redact_url(url), data.decode("utf-8", errors="replace")
    finally:
        for r in {id(r): r for r in (first, last)}.values():
            r.close()


def remote_info(source, shard_id, policy=FetchPolicy(), session=None, stop=None):
    """Size, sha256 and ETag of shard_id at source (a HEAD, retried like a fetch)."""
    url = source.url(shard_id)
    own = session is None
    session = session or requests.Session()
    failures = attempts = 0
    try:
        while True:
            if stop is not None and stop.is_set():
                raise FetchCancelled(f"shard {shard_id:05d} ({redact_url(url)}): cancelled",
                                     shard_id=shard_id, url=redact_url(url), attempts=attempts)
            attempts += 1
            try:
                return _probe(source, shard_id, url, policy, session)
            except _Fatal as e:
                raise _permanent(source, shard_id, url, attempts, str(e)) from None
            except (_Retry, *NETWORK_ERRORS) as e:
                cause = e.cause if isinstance(e, _Retry) else _describe(e, source.token)
                failures += 1
                if policy.max_attempts is not None and failures >= policy.max_attempts:
                    raise _transient(source, shard_id, url, attempts, cause) from None
                delay = _backoff(policy, failures, getattr(e, "retry_after", None))
                logger.info("shard %05d: HEAD failed (%s); retrying in %.1fs", shard_id, cause, delay)
                if _sleep(delay, stop):
                    raise FetchCancelled(f"shard {shard_id:05d} ({redact_url(url)}): cancelled",
                                         shard_id=shard_id, url=redact_url(url), attempts=attempts) from None
    finally:
        if own:
            session.close()


def _backoff(policy, failures, retry_after=None):
    """Full jitter: uniform in [0, min(max, initial * 2**(failures-1))], at least Retry-After."""
    cap = min(policy.backoff_max, policy.backoff_initial * 2 ** max(0, failures - 1))
    delay = random.uniform(0, cap) if failures > 0 else 0.0
    if retry_after is not None:
        delay = max(delay, min(retry_after, policy.retry_after_max))
    return delay


def _sleep(seconds, stop):
    """Sleep, or return True at once when stop is set."""
    if stop is None:
        time.sleep(seconds)
        return False
    return stop.wait(seconds)


def _message(shard_id, url, attempts, cause):
    return f"shard {shard_id:05d} ({redact_url(url)}): {cause} (after {attempts} attempt{'s' * (attempts != 1)})"


def _permanent(source, shard_id, url, attempts, cause):
    cause = _scrub(cause, source.token)
    return PermanentFetchError(_message(shard_id, url, attempts, cause), shard_id=shard_id,
                               url=redact_url(url), attempts=attempts, cause=cause)


def _transient(source, shard_id, url, attempts, cause):
    cause = _scrub(cause, source.token)
    return TransientFetchError(_message(shard_id, url, attempts, cause), shard_id=shard_id,
                               url=redact_url(url), attempts=attempts, cause=cause)


# -----------------------------------------------------------------------------
# Stop watchdog: a read blocked in a stall returns as soon as stop is set

def _shutdown(resp):
    conn = getattr(resp.raw, "connection", None) or getattr(resp.raw, "_connection", None)
    sock = getattr(conn, "sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class _StopWatch:
    """While a transfer runs, poll `stop`; when it is set, shut the live connection down."""

    def __init__(self, stop):
        self.stop = stop
        self.resp = None
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.thread = None
        if stop is not None:
            self.thread = threading.Thread(target=self._run, name="fetch-stopwatch", daemon=True)
            self.thread.start()

    def _run(self):
        while not self.done.wait(WATCH_POLL):
            if self.stop.is_set():
                with self.lock:
                    if self.resp is not None:
                        _shutdown(self.resp)
                        self.resp = None

    def watch(self, resp):
        with self.lock:
            self.resp = resp
        if self.stop is not None and self.stop.is_set():
            _shutdown(resp)

    def unwatch(self):
        with self.lock:
            self.resp = None

    def close(self):
        self.done.set()
        if self.thread is not None:
            self.thread.join()


# -----------------------------------------------------------------------------
# Files: data dir, partial + sidecar

def ensure_data_dir(data_dir):
    """Create data_dir if needed; ConfigError naming it when it cannot be created or written."""
    data_dir = Path(data_dir)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"data dir {str(data_dir)!r} cannot be created ({e.strerror or e}): "
                          f"choose a writable directory (--data-dir or SHARDSTREAM_DATA_DIR)") from None
    probe = data_dir / f".shardstream-write-test.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"data dir {str(data_dir)!r} is not writable ({e.strerror or e}): "
                          f"choose a writable directory (--data-dir or SHARDSTREAM_DATA_DIR)") from None
    return data_dir


def _sidecar(partial):
    return partial.with_name(partial.name + ".json")


def _remove(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_sidecar(partial, info):
    """Write partial's sidecar, before the partial itself exists. No temp file and rename: a sidecar torn
    by a kill is one whose partial never came (swept as an orphan) or does not parse (the partial is
    discarded) - and a temp file would be a name no sweep knows."""
    with fopen_nofollow(_sidecar(partial), "w") as f:
        json.dump(_sidecar_record(info), f)
        f.flush()
        os.fsync(f.fileno())


def _sidecar_matches(meta, info):
    """Whether a sidecar belongs to the file info describes (a sidecar without last_modified predates it)."""
    want = _sidecar_record(info)
    if isinstance(meta, dict) and "last_modified" not in meta:
        want.pop("last_modified")
    return meta == want


def _sidecar_record(info):
    return {"size": info.size, "sha256": info.sha256, "etag": info.etag, "last_modified": info.last_modified}


class _HashThread:
    """sha256 on a helper thread, so hashing one chunk overlaps receiving and writing the next
    (hashlib, recv and write all release the GIL). Buffers circulate: free -> filled -> hashed -> free."""

    def __init__(self, hasher, chunk_bytes, buffers=4):
        self.hasher = hasher
        self.free = queue.SimpleQueue()
        self.todo = queue.SimpleQueue()
        for _ in range(buffers):
            self.free.put(memoryview(bytearray(chunk_bytes)))
        self.thread = threading.Thread(target=self._run, name="fetch-sha256", daemon=True)
        self.thread.start()

    def _run(self):
        update = self.hasher.update
        while (item := self.todo.get()) is not None:
            mv, n = item
            update(mv[:n])
            self.free.put(mv)

    def free_buffer(self):
        return self.free.get()

    def submit(self, mv, n):
        self.todo.put((mv, n))

    def close(self):
        self.todo.put(None)
        self.thread.join()


def _load_sync_file_range():
    """libc's sync_file_range (Linux), to start writing a file back while it is still being received,
    so the final fsync has little left to do. None elsewhere: then fsync does it all at the end."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()
SYNC_FILE_RANGE_WRITE = 2
WRITEBACK_BYTES = 8 << 20         # start writeback every this many bytes received


class _DiskError(Exception):
    def __init__(self, err):
        super().__init__(err)
        self.err = err


def _write_all(fd, view):
    try:
        while view:
            n = os.write(fd, view)
            view = view[n:]
    except OSError as e:
        raise _DiskError(e) from None


# -----------------------------------------------------------------------------
# The fetch

def fetch_shard(source, shard_id, data_dir, policy=FetchPolicy(), *, session=None, stop=None,
                on_bytes=None, info=None, on_retry=None):
    """Bring shard_id from source to data_dir/shard_XXXXX.parquet, verified. See the module docstring.

    session: a requests.Session (one per thread); stop: a threading.Event that cancels within ~1 s
    (FetchCancelled, partial kept); on_bytes(n): called as bytes land; info: a RemoteInfo already known;
    on_retry(cause): called when a try failed and the call tries again (the caller may give up waiting).
    """
    t0 = time.monotonic()
    name = shard_name(shard_id)
    url = source.url(shard_id)
    data_dir = ensure_data_dir(data_dir)
    source.check_data_dir(data_dir)
    final = data_dir / name
    lock_path = data_dir / f"{name}.lock"
    try:
        check_shard_name(final)
        check_own_file(lock_path)
    except UnsafePathError as e:
        raise PermanentFetchError(_message(shard_id, url, 0, str(e)), shard_id=shard_id, url=redact_url(url),
                                  cause=str(e)) from None
    if final.is_file():
        return _present(shard_id, final, t0)
    own = session is None
    session = session or requests.Session()
    lock = filelock.FileLock(str(lock_path))
    try:
        waited = False
        while True:
            if stop is not None and stop.is_set():
                raise FetchCancelled(f"shard {shard_id:05d} ({redact_url(url)}): cancelled while waiting "
                                     f"for another fetch of it", shard_id=shard_id, url=redact_url(url))
            try:
                lock.acquire(timeout=LOCK_POLL)
                break
            except filelock.Timeout:
                if not waited:
                    waited = True
                    logger.warning("shard %05d: another process is fetching it (it holds %s); waiting for it "
                                   "to finish", shard_id, lock_path)
        try:
            if final.is_file():         # another process fetched it while we waited
                return _present(shard_id, final, t0)
            transfer = _Transfer
            if source.kind in OBJECT_STORE_KINDS:       # s3/gs/local: ranged reads through fsspec
                from .objectstore import ObjectTransfer as transfer
            return transfer(source, shard_id, url, final, policy, session, stop, on_bytes, info, t0,
                            on_retry).run()
        finally:
            lock.release()
    finally:
        if own:
            session.close()


def _present(shard_id, final, t0):
    return FetchResult(shard_id, final, final.stat().st_size, None, 0, 0, time.monotonic() - t0, 0,
                       already_present=True)


class _Transfer:
    """The state of one fetch while its lock is held: retries, the partial file, the running hash."""

    def __init__(self, source, shard_id, url, final, policy, session, stop, on_bytes, info, t0, on_retry=None):
        self.source, self.shard_id, self.url, self.final = source, shard_id, url, final
        self.policy, self.session, self.stop, self.on_bytes = policy, session, stop, on_bytes
        self.info, self.t0, self.on_retry = info, t0, on_retry
        self.attempts = 0               # requests tried
        self.failures = 0               # failed tries in a row without progress
        self.full_downloads = 0         # complete downloads that failed verification
        self.bytes_downloaded = 0
        self.resumed_from = 0
        self.partial = None             # Path of our partial file
        self.pos = 0                    # bytes in it (all hashed into self.hasher)
        self.hasher = None

    # --- the loop

    def run(self):
        watch = _StopWatch(self.stop)
        try:
            while True:
                self._check_stop()
                try:
                    return self._try(watch)
                except _Retry as e:
                    self.failures = 0 if e.progressed else self.failures + 1
                    if self.policy.max_attempts is not None and self.failures >= self.policy.max_attempts:
                        raise self._error(TransientFetchError, e.cause) from None
                    delay = _backoff(self.policy, self.failures, e.retry_after)
                    cause = _scrub(e.cause, self.source.token)
                    logger.info("shard %05d: %s; resuming at byte %d in %.1fs", self.shard_id, cause, self.pos, delay)
                    if self.on_retry is not None:
                        self.on_retry(cause)
                    if _sleep(delay, self.stop):
                        self._check_stop()
                except _Corrupt as e:
                    self.full_downloads += 1
                    self._discard()
                    self.info = None    # ask again: the remote file may have changed
                    if self.full_downloads >= self.policy.max_full_downloads:
                        raise self._error(PermanentFetchError, f"{e} (still wrong after {self.full_downloads} "
                                          f"full downloads)") from None
                    logger.warning("shard %05d: downloaded file is corrupt (%s); deleted, fetching again",
                                   self.shard_id, _scrub(e, self.source.token))
                except _Fatal as e:
                    self._discard()     # nothing worth resuming from a source that refuses the shard
                    raise self._error(PermanentFetchError, str(e)) from None
                except _DiskError as e:
                    raise self._disk_error(e.err) from None
        finally:
            watch.close()

    def _try(self, watch):
        if self.info is None:
            self.attempts += 1
            try:
                self.info = _probe(self.source, self.shard_id, self.url, self.policy, self.session)
            except NETWORK_ERRORS as e:
                raise _Retry(f"HEAD failed: {_describe(e, self.source.token)}") from None
        size = self.info.size
        if size is not None and size > self.policy.max_shard_bytes:
            raise _Fatal(f"the source says {size} bytes, over the per-shard cap of {self.policy.max_shard_bytes} "
                         f"(FetchPolicy.max_shard_bytes)")
        if self.partial is not None and not self.partial.exists():
            logger.warning("shard %05d: partial file %s vanished; starting over", self.shard_id, self.partial.name)
            self._discard()
        if self.partial is None:
            self._open_partial()
        if size is None or self.pos < size:
            self._download(watch)
        return self._finish()

    def _check_stop(self):
        if self.stop is not None and self.stop.is_set():
            raise FetchCancelled(_message(self.shard_id, self.url, self.attempts, "cancelled"),
                                 shard_id=self.shard_id, url=redact_url(self.url), attempts=self.attempts)

    def _error(self, cls, cause):
        cause = _scrub(cause, self.source.token)
        return cls(_message(self.shard_id, self.url, self.attempts, cause), shard_id=self.shard_id,
                   url=redact_url(self.url), attempts=self.attempts, cause=cause)

    def _disk_error(self, err):
        where = self.partial or self.final
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            self._discard()
            return DiskSpaceError(f"shard {self.shard_id:05d}: disk full writing {where} "
                                  f"({err.strerror}); the partial file was removed: free space in "
                                  f"{self.final.parent} or lower the cache budget")
        return self._error(PermanentFetchError, f"cannot write {where}: {err.strerror or err}")

    # --- partial files

    def _open_partial(self):
        """Adopt a partial file whose sidecar matches the remote info (the biggest), delete the others,
        or start a new one."""
        d, name, info = self.final.parent, self.final.name, self.info
        best = None
        for p in sorted(d.glob(f"{name}.*.partial")):
            try:
                with fopen_nofollow(_sidecar(p)) as f:
                    meta = json.load(f)
                have = p.lstat().st_size if p.is_file() and not p.is_symlink() else None
            except (OSError, ValueError):
                meta, have = None, None
            meta = meta if have is not None else None
            ok = (_sidecar_matches(meta, info) and (info.sha256 or _validator(info)) is not None
                  and (info.size is None or have <= info.size))
            if ok and (best is None or have > best[1]):
                if best is not None:
                    self._remove_partial(best[0])
                best = (p, have)
            else:
                logger.info("shard %05d: deleting partial file %s (stale or superseded)", self.shard_id, p.name)
                self._remove_partial(p)
        for s in d.glob(f"{name}.*.partial.json"):      # sidecars whose partial is gone
            if not s.with_name(s.name[:-len(".json")]).exists():
                _remove(s)
        self.hasher = hashlib.sha256()
        if best is not None:
            self.partial, self.pos = best
            try:
                sha256_file(self.partial, limit=self.pos, hasher=self.hasher)
            except OSError as e:
                raise _DiskError(e) from None
            self.resumed_from = self.pos
            logger.info("shard %05d: resuming partial file %s at byte %d", self.shard_id, self.partial.name, self.pos)
            return
        self.partial = d / f"{name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial"
        self.pos = 0
        try:
            _write_sidecar(self.partial, info)
            os.close(open_nofollow(self.partial, os.O_WRONLY | os.O_CREAT))
        except UnsafePathError as e:
            raise _Fatal(str(e)) from None
        except OSError as e:
            raise _DiskError(e) from None

    def _remove_partial(self, p):
        _remove(p)
        _remove(_sidecar(p))

    def _discard(self):
        if self.partial is not None:
            self._remove_partial(self.partial)
        self.partial, self.pos, self.hasher = None, 0, None

    def _restart(self, fd, why):
        """Drop what the partial holds and write from byte 0 again."""
        logger.info("shard %05d: %s; restarting from byte 0", self.shard_id, why)
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
        except OSError as e:
            raise _DiskError(e) from None
        self.pos, self.hasher = 0, hashlib.sha256()

    # --- one GET

    def _download(self, watch):
        info = self.info
        size = info.size
        # Without a sha256 at the end, a resume is safe only where the server can say the bytes are of
        # the same file: If-Range with a strong ETag or Last-Modified, checked again on the answer.
        guard = info.sha256 is None
        if guard and self.pos > 0 and _validator(info) is None:
            logger.info("shard %05d: the source gives no checksum and no validator (strong ETag or "
                        "Last-Modified) to resume against; starting over from byte 0", self.shard_id)
            self._discard()
            self._open_partial()
        start = self.pos
        headers = {}
        if start > 0:
            headers["Range"] = f"bytes={start}-"
            if guard:
                headers["If-Range"] = _validator(info)
        self.attempts += 1
        resp = None
        try:
            fd = open_nofollow(self.partial, os.O_WRONLY | os.O_CREAT)
        except OSError as e:
            raise _DiskError(e) from None
        try:
            os.lseek(fd, self.pos, os.SEEK_SET)
            try:
                first, resp = _request(self.session, self.source, "GET", self.url, self.policy, headers)
                if first is not resp:
                    first.close()
                watch.watch(resp)
                self._check_stop()
                if resp.status_code == 416 and start > 0:
                    self._restart(fd, "the server refused to resume (416)")
                    raise _Retry("HTTP 416 on resume")
                _check_status(resp)
                changed = _changed_validator(info, resp) if guard else None
                if changed is not None:
                    self.info = None    # ask again what the file is now, and start it over
                    self._discard()
                    raise _Retry(changed)
                if resp.status_code == 206:
                    got_start, total = _content_range(resp.headers.get("Content-Range"))
                    if got_start != start:
                        self._restart(fd, f"the server sent a range starting at {got_start}, not {start}")
                        raise _Retry("wrong Content-Range")
                    if total is not None and size is not None and total != size:
                        self.info = None    # the file changed under us: ask again, start over
                        self._discard()
                        raise _Retry(f"the server now says {total} bytes, not {size}; starting over")
                elif start > 0:
                    self._restart(fd, f"the server sent the whole file (HTTP {resp.status_code}), not the "
                                      f"range from byte {start}")
                limit = size if size is not None else self.policy.max_shard_bytes
                self._stream(resp, fd, limit)
                if size is None and self.pos >= limit and _more_body(resp):
                    raise _Fatal(f"the body is larger than the per-shard cap of {limit} bytes "
                                 f"(FetchPolicy.max_shard_bytes)")
            except NETWORK_ERRORS as e:
                self._check_stop()
                raise _Retry(_describe(e, self.source.token), progressed=self.pos > start) from None
            self._check_stop()
            if size is not None and self.pos < size:
                raise _Retry(f"connection ended after {self.pos} of {size} bytes", progressed=self.pos > start)
        finally:
            watch.unwatch()
            if resp is not None:
                resp.close()
            os.close(fd)

    def _stream(self, resp, fd, limit):
        """The hot loop: read from the socket into a 1 MiB buffer, writing each read to the partial file at
        once (a kill or a drop loses nothing received), and hand the full buffer to the hashing thread.
        on_bytes hears of bytes when a read drains the socket, else every BYTES_REPORT bytes or
        BYTES_REPORT_SECONDS. A transfer slower than
        low_speed_limit for low_speed_time seconds is abandoned (a _Retry that counts as a failure), so a
        trickle cannot hold a shard forever."""
        read, body_left = _body_reader(resp)
        chunk = self.policy.chunk_bytes
        on_bytes, stop = self.on_bytes, self.stop
        floor, window = self.policy.low_speed_limit, self.policy.low_speed_time
        writeback = _sync_file_range if self.policy.fsync else None
        flushed = self.pos
        now = time.monotonic()
        window_t, window_pos = now, self.pos
        reported, reported_t = self.pos, now
        hashing = _HashThread(self.hasher, chunk)
        mv, fill = hashing.free_buffer(), 0
        try:
            while self.pos < limit and body_left > 0:
                want = min(chunk - fill, limit - self.pos, body_left)
                n = read(mv[fill:fill + want])     # a drop raises: the bytes so far are on disk already
                if not n:
                    break
                _write_all(fd, mv[fill:fill + n])
                fill += n
                self.pos += n
                self.bytes_downloaded += n
                body_left -= n
                if fill == chunk:
                    hashing.submit(mv, fill)
                    mv, fill = hashing.free_buffer(), 0
                now = time.monotonic()
                if on_bytes is not None and (n < want or self.pos - reported >= BYTES_REPORT   # drained:
                                             or now - reported_t >= BYTES_REPORT_SECONDS):  # may block now
                    on_bytes(self.pos - reported)
                    reported, reported_t = self.pos, now
                if writeback is not None and self.pos - flushed >= WRITEBACK_BYTES:
                    writeback(fd, flushed, self.pos - flushed, SYNC_FILE_RANGE_WRITE)   # advisory
                    flushed = self.pos
                if window and now - window_t >= window:
                    rate = (self.pos - window_pos) / (now - window_t)
                    if rate < floor:
                        raise _Retry(f"too slow: {rate:.0f} bytes/s over the last {now - window_t:.0f} s, under "
                                     f"the floor of {floor} bytes/s (FetchPolicy.low_speed_limit); resuming on "
                                     f"a new connection")
                    window_t, window_pos = now, self.pos
                if stop is not None and stop.is_set():
                    break
        finally:
            if fill:
                hashing.submit(mv, fill)
            hashing.close()     # every byte written is hashed before anyone reads self.hasher
            if on_bytes is not None and self.pos > reported:
                on_bytes(self.pos - reported)

    # --- verify and commit

    def _finish(self):
        info = self.info
        digest = self.hasher.hexdigest()
        try:
            verify_shard(self.partial, info.size, info.sha256, parquet=False, actual_sha256=digest)
        except CorruptShardError as e:
            raise _Corrupt(f"{e} (the sha256 listed in {info.sha256_from})" if info.sha256_from else str(e)) from None
        checked = "sha256" if info.sha256 else "md5" if info.md5 else "size"
        if self.policy.verify_parquet:
            try:
                check_parquet(self.partial)
                if self.policy.verify == "decode":
                    decode_parquet(self.partial)
            except CorruptShardError as e:
                if info.sha256 is not None or info.md5 is not None:    # the source's own bytes: a new
                    self._discard()                                     # download cannot help
                    raise _Fatal(f"the source's file is not a valid shard: {e}") from None
                raise _Corrupt(str(e)) from None
            checked = "size+footer" if checked == "size" else checked
            checked += "+decode" if self.policy.verify == "decode" else ""
        self._commit()
        size = self.final.stat().st_size
        logger.debug("shard %05d: verified (%s), %d bytes in %.2fs", self.shard_id, checked, size,
                     time.monotonic() - self.t0)
        return FetchResult(self.shard_id, self.final, size, info.sha256 or digest, self.bytes_downloaded,
                           self.attempts, time.monotonic() - self.t0, self.resumed_from, checked=checked)

    def _commit(self):
        """fsync, rename to the final name, fsync the dir. A commit that fails takes the partial with it:
        a verified file is never left behind under a name that is not final."""
        try:
            check_shard_name(self.final)
            if self.policy.fsync:
                fd = os.open(self.partial, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            os.replace(self.partial, self.final)
        except UnsafePathError as e:
            self._discard()
            raise _Fatal(str(e)) from None
        except OSError as e:
            self._discard()
            raise _DiskError(e) from None
        _remove(_sidecar(self.partial))
        if self.policy.fsync:
            try:
                _fsync_dir(self.final.parent)
            except OSError as e:
                raise _DiskError(e) from None


def _body_reader(resp):
    """(readinto, bytes the body may still give): straight from the socket's buffered reader when the
    body has a Content-Length (no copies, no per-chunk bookkeeping), else through http.client/urllib3."""
    hr = getattr(resp.raw, "_fp", None)
    if isinstance(hr, http.client.HTTPResponse) and not hr.chunked and hr.length is not None \
            and hasattr(hr.fp, "readinto1"):
        return hr.fp.readinto1, hr.length
    reader = hr if hasattr(hr, "readinto") else resp.raw
    return reader.readinto, float("inf")


def _content_range(value):
    """'bytes 100-199/1000' -> (100, 1000); total None for '*'; (None, None) when unparseable."""
    m = re.match(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", value or "")
    if not m:
        return None, None
    return int(m.group(1)), (None if m.group(3) == "*" else int(m.group(3)))


def _more_body(resp):
    """After reading up to the cap: does the body go on?"""
    reader = getattr(resp.raw, "_fp", None) or resp.raw
    try:
        return bool(reader.read(1))
    except NETWORK_ERRORS:
        return False
