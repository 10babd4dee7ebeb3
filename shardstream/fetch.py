"""One shard from a source to disk, never wrong: the transfer loop every downloader calls.

    result = fetch_shard(source, 7, "/data", FetchPolicy(), stop=stop_event, on_bytes=bar.update)

How a fetch goes (the source's side of each step is a transport, transport.py: httptransport.py for
http(s) and the Hub, objectstore.py for s3/gs/local folders through fsspec):
1. If `shard_00007.parquet` is there it is done (a file under its final name is always verified).
2. Take the per-shard lock `shard_00007.parquet.lock` (filelock), so two processes never fetch the same
   shard at once: the second waits (and says so once), then finds the final file.
3. Probe: what the source says the shard is (size, sha256 or md5, validators), held against the listing
   the Source was pinned to (Source.check_pinned: a shard changed since the run started is a
   PermanentFetchError). A partial file from an earlier try (`shard_00007.parquet.<unique>.partial`, with
   a `.partial.json` sidecar recording what it belongs to) is resumed when the sidecar matches and the
   transport can resume it safely, else deleted.
4. Receive the bytes from where the partial ends into the partial file (each read written at once) and a
   sha256 on a helper thread. A dropped connection, a stall, 5xx or 429 is retried with exponential
   backoff and full jitter (Retry-After honoured), continuing from the bytes on disk; a transfer slower
   than FetchPolicy.low_speed_limit for low_speed_time is abandoned and resumed the same way. A source
   whose file changed, or that lies about a range, starts the shard over (never a splice).
5. Verify: byte count == size, sha256 / md5 when the source gives one, parquet footer with a `text`
   column (FetchPolicy.verify="decode": every page decoded too). A bad file is deleted and fetched again;
   a size/checksum that never matches becomes PermanentFetchError. FetchResult.checked says what vouched
   for it; a source without checksums is said once at WARNING (FetchPolicy.require_checksum refuses it).
6. fsync the file, rename it to its final name, fsync the directory (a failed commit removes the partial).

Errors name the shard, the URL without secrets, attempts and cause, and never the token. Nothing is
written through a symbolic link planted in the data dir (safefs.py), nor committed over a directory.
"""
import ctypes
import errno
import hashlib
import json
import logging
import os
import queue
import random
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import requests

from . import layout
from .cache import lock_exclusive, unlock_and_remove
from .checksums import CHECKSUM_FILE
from .errors import (ConfigError, CorruptShardError, DiskSpaceError, FetchCancelled, PermanentFetchError,
                     SourceUnreachable, TransientFetchError, UnsafePathError)
from .httptransport import HttpTransport
from .objectstore import ObjectTransport
from .safefs import check_own_file, check_shard_name, ensure_book_dir, fopen_nofollow, open_nofollow
from .shards import shard_name
from .source import OBJECT_STORE_KINDS, hf_endpoint, redact_url
from .transport import Fatal, Retry, scrub
from .verify import check_parquet, decode_parquet, sha256_file, verify_shard

logger = logging.getLogger(__name__)

LOCK_POLL = 0.25            # seconds between checks of `stop` while waiting for another fetcher's lock
WATCH_POLL = 0.1            # seconds between checks of `stop` while a transfer is in flight
VERIFY_LEVELS = ("footer", "decode")
UNREACHED_TRIES = 3         # a server that never answered: say so after this many tries...
UNREACHED_SECONDS = 8.0     # ...or this long, whichever comes first (and go on retrying)
BYTES_REPORT = 256 << 10    # call on_bytes at least every this many bytes received...
BYTES_REPORT_SECONDS = 0.5  # ...or this often, so a slow transfer's progress shows


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
# Outcomes of one try (transport.Retry / Fatal, and these), turned into the public errors at the top

class _Corrupt(Exception):
    """A complete download failed verification."""


def transport_for(source):
    """The transport class (transport.py) for source's kind: fsspec's ranged reads, or HTTP."""
    return ObjectTransport if source.kind in OBJECT_STORE_KINDS else HttpTransport


def _probe(source, transport, shard_id, policy):
    """What the source says about one shard now (the transport's HEAD or stat), held against the listing
    the source was pinned to: a shard that changed since is a Fatal naming what changed."""
    info, changed = source.check_pinned(shard_id, transport.probe())
    if changed:
        raise Fatal(changed)
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
        raise Fatal(f"the source gives no sha256 or md5 for this shard and a checksum is required "
                     f"(--require-checksum / SHARDSTREAM_REQUIRE_CHECKSUM / FetchPolicy.require_checksum): {how}")
    with _warned_lock:
        if source.name in _warned_no_checksum:
            return
        _warned_no_checksum.add(source.name)
    logger.log(logging.INFO if source.kind == "file" else logging.WARNING,
               "%s gives no checksum for its shards: each is checked by its size and parquet footer only, "
               "which cannot catch a flipped byte inside a data page. To verify every byte, %s; to refuse "
               "such shards, set require_checksum (--require-checksum)", redact_url(source.name), how)


def remote_info(source, shard_id, policy=FetchPolicy(), session=None, stop=None):
    """Size, sha256 and ETag of shard_id at source (a HEAD or stat, retried like a fetch)."""
    url = source.url(shard_id)
    own = session is None
    session = session or requests.Session()
    transport = transport_for(source)(source, shard_id, policy, session)
    failures = attempts = 0
    unreached = _Unreached()
    try:
        while True:
            if stop is not None and stop.is_set():
                raise FetchCancelled(f"shard {shard_id:05d} ({redact_url(url)}): cancelled",
                                     shard_id=shard_id, url=redact_url(url), attempts=attempts)
            attempts += 1
            try:
                return _probe(source, transport, shard_id, policy)
            except Fatal as e:
                raise _permanent(source, shard_id, url, attempts, str(e)) from None
            except Retry as e:
                cause = e.cause
                unreached.note(e, source)
                failures += 1
                if policy.max_attempts is not None and failures >= policy.max_attempts:
                    err = _transient(source, shard_id, url, attempts, cause)
                    raise unreached.error(TransientFetchError, str(err), shard_id=shard_id, url=err.url,
                                          attempts=attempts, cause=err.cause) from None
                delay = _backoff(policy, failures, e.retry_after)
                logger.info("shard %05d: HEAD failed (%s); retrying in %.1fs", shard_id, cause, delay)
                if _sleep(delay, stop):
                    raise FetchCancelled(f"shard {shard_id:05d} ({redact_url(url)}): cancelled",
                                         shard_id=shard_id, url=redact_url(url), attempts=attempts) from None
    finally:
        if own:
            session.close()


_said_unreached = set()
_said_lock = threading.Lock()


class _Unreached:
    """Watches the tries of one call for a server that never answered in this process. Past
    UNREACHED_TRIES or UNREACHED_SECONDS it says so once per server, at ERROR, with what to do (the call
    goes on retrying: a network that comes back is ridden out); `error` is then what the call raises if
    it gives up, a SourceUnreachable carrying the same advice."""

    def __init__(self):
        self.tries, self.since, self.advice = 0, None, None

    def note(self, retry, source):
        if retry.unreached is None:
            self.tries, self.since, self.advice = 0, None, None
            return
        now = time.monotonic()
        self.since = now if self.since is None else self.since
        self.tries += 1
        if self.advice is not None or (self.tries < UNREACHED_TRIES and now - self.since < UNREACHED_SECONDS):
            return
        hub = source.kind == "hf" or urlsplit(source.base_url).hostname == urlsplit(hf_endpoint()).hostname
        where = (f"HF_ENDPOINT (now {hf_endpoint()}) for the Hub" if hub else
                 f"--source / SHARDSTREAM_SOURCE (now {redact_url(source.base_url)})")
        self.advice = (f"cannot reach {retry.unreached}: it has not answered once. Check the network and "
                       f"{where}. Offline, `./run demo` streams from a local server, and `shardstream serve "
                       f"DIR` serves shards you have for --source http://127.0.0.1:PORT")
        with _said_lock:
            if retry.unreached in _said_unreached:
                return
            _said_unreached.add(retry.unreached)
        logger.error("%s (still retrying)", self.advice)

    def error(self, cls, message, **kw):
        """The error a call that gives up raises: SourceUnreachable with the advice when it applies."""
        if self.advice is None:
            return cls(message, **kw)
        return SourceUnreachable(f"{message}. {self.advice}", **kw)


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
    cause = scrub(cause, source.token)
    return PermanentFetchError(_message(shard_id, url, attempts, cause), shard_id=shard_id,
                               url=redact_url(url), attempts=attempts, cause=cause)


def _transient(source, shard_id, url, attempts, cause):
    cause = scrub(cause, source.token)
    return TransientFetchError(_message(shard_id, url, attempts, cause), shard_id=shard_id,
                               url=redact_url(url), attempts=attempts, cause=cause)


# -----------------------------------------------------------------------------
# Stop watchdog: a read blocked in a stall returns as soon as stop is set

class _StopWatch:
    """While a transfer runs, poll `stop`; when it is set, abort the live body (its read returns)."""

    def __init__(self, stop):
        self.stop = stop
        self.body = None
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
                    if self.body is not None:
                        self.body.abort()
                        self.body = None

    def watch(self, body):
        with self.lock:
            self.body = body
        if self.stop is not None and self.stop.is_set():
            body.abort()

    def unwatch(self):
        with self.lock:
            self.body = None

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
    return layout.sidecar_path(partial)


def _legacy_sidecar(partial):
    """Where an older shardstream kept a partial's sidecar: beside it (read once, to resume it)."""
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


def _md5_file(path):
    """Hex md5 of a file (S3's single-part ETag and GCS's md5Hash are md5s of the bytes)."""
    h = hashlib.md5(usedforsecurity=False)
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except OSError as e:
        raise _DiskError(e) from None
    return h.hexdigest()


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
                on_bytes=None, info=None, on_retry=None, on_link=None):
    """Bring shard_id from source to data_dir/shard_XXXXX.parquet, verified. See the module docstring.

    session: a requests.Session (one per thread); stop: a threading.Event that cancels within ~1 s
    (FetchCancelled, partial kept); on_bytes(n): called as bytes land; info: a RemoteInfo already known;
    on_retry(cause): called when a try failed and the call tries again (the caller may give up waiting);
    on_link(busy): True when a try starts receiving, False when its bytes are in (or it failed): while the
    call verifies and commits, or backs off, the link is free for another transfer.
    """
    t0 = time.monotonic()
    name = shard_name(shard_id)
    url = source.url(shard_id)
    data_dir = ensure_data_dir(data_dir)
    source.check_data_dir(data_dir)
    final = data_dir / name
    lock_path = layout.lock_path(data_dir, shard_id)
    try:
        check_shard_name(final)
        ensure_book_dir(data_dir)
        check_own_file(lock_path)
    except UnsafePathError as e:
        raise PermanentFetchError(_message(shard_id, url, 0, str(e)), shard_id=shard_id, url=redact_url(url),
                                  cause=str(e)) from None
    if final.is_file():
        return _present(shard_id, final, t0)
    own = session is None
    session = session or requests.Session()
    try:
        fd = lock_exclusive(lock_path, stop, LOCK_POLL, on_wait=lambda: logger.warning(
            "shard %05d: another process is fetching it (it holds %s); waiting for it to finish", shard_id, lock_path))
        if fd is None:
            raise FetchCancelled(f"shard {shard_id:05d} ({redact_url(url)}): cancelled while waiting "
                                 f"for another fetch of it", shard_id=shard_id, url=redact_url(url))
        try:
            if final.is_file():         # another process fetched it while we waited
                return _present(shard_id, final, t0)
            transport = transport_for(source)(source, shard_id, policy, session)
            return _Transfer(source, transport, shard_id, url, final, policy, stop, on_bytes, info, t0,
                             on_retry, on_link).run()
        finally:
            unlock_and_remove(lock_path, fd)        # a waiter that locked the removed file looks again
    finally:
        if own:
            session.close()


def _present(shard_id, final, t0):
    return FetchResult(shard_id, final, final.stat().st_size, None, 0, 0, time.monotonic() - t0, 0,
                       already_present=True)


class _Transfer:
    """The state of one fetch while its lock is held: retries, the partial file, the running hash. The
    source's side of each try is the transport's (transport.py)."""

    def __init__(self, source, transport, shard_id, url, final, policy, stop, on_bytes, info, t0, on_retry=None,
                 on_link=None):
        self.source, self.transport, self.shard_id, self.url, self.final = source, transport, shard_id, url, final
        self.policy, self.stop, self.on_bytes = policy, stop, on_bytes
        self.info, self.t0, self.on_retry, self.on_link = info, t0, on_retry, on_link
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
        unreached = _Unreached()
        try:
            while True:
                self._check_stop()
                try:
                    return self._try(watch)
                except Retry as e:
                    unreached.note(e, self.source)
                    if e.reprobe:       # the file changed at the source: ask what it is now, start over
                        self.info = None
                        self._discard()
                    elif e.restart:     # the bytes kept are no good
                        self._discard()
                    self.failures = 0 if e.progressed else self.failures + 1
                    if self.policy.max_attempts is not None and self.failures >= self.policy.max_attempts:
                        err = self._error(TransientFetchError, e.cause)
                        raise unreached.error(TransientFetchError, str(err), shard_id=self.shard_id, url=err.url,
                                              attempts=self.attempts, cause=err.cause) from None
                    delay = _backoff(self.policy, self.failures, e.retry_after)
                    cause = scrub(e.cause, self.source.token)
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
                                   self.shard_id, scrub(e, self.source.token))
                except Fatal as e:
                    self._discard()     # nothing worth resuming from a source that refuses the shard
                    raise self._error(PermanentFetchError, str(e)) from None
                except _DiskError as e:
                    raise self._disk_error(e.err) from None
        finally:
            watch.close()

    def _try(self, watch):
        if self.info is None:
            self.attempts += 1
            self.info = _probe(self.source, self.transport, self.shard_id, self.policy)
        size = self.info.size
        if size is not None and size > self.policy.max_shard_bytes:
            raise Fatal(f"the source says {size} bytes, over the per-shard cap of {self.policy.max_shard_bytes} "
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
        cause = scrub(cause, self.source.token)
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
                side = _sidecar(p) if os.path.lexists(_sidecar(p)) else _legacy_sidecar(p)
                with fopen_nofollow(side) as f:
                    meta = json.load(f)
                have = p.lstat().st_size if p.is_file() and not p.is_symlink() else None
            except (OSError, ValueError):
                meta, have = None, None
            meta = meta if have is not None else None
            ok = (_sidecar_matches(meta, info) and self.transport.can_resume(info)
                  and (info.size is None or have <= info.size))
            if ok and (best is None or have > best[1]):
                if best is not None:
                    self._remove_partial(best[0])
                best = (p, have)
            else:
                logger.info("shard %05d: deleting partial file %s (stale or superseded)", self.shard_id, p.name)
                self._remove_partial(p)
        for s in layout.book_dir(d).glob(f"{name}.*.partial.json"):     # sidecars whose partial is gone
            if not layout.partial_of_sidecar(s).exists():
                _remove(s)
        for s in d.glob(f"{name}.*.partial.json"):      # an older layout's, beside the partials
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
            raise Fatal(str(e)) from None
        except OSError as e:
            raise _DiskError(e) from None

    def _remove_partial(self, p):
        _remove(p)
        _remove(_sidecar(p))
        _remove(_legacy_sidecar(p))

    def _discard(self):
        if self.partial is not None:
            self._remove_partial(self.partial)
        self.partial, self.pos, self.hasher = None, 0, None

    def _restart(self, fd, why):
        """Drop what the partial holds and write from byte 0 again (the source sends the whole file)."""
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
        if self.pos > 0 and not self.transport.can_resume(info):
            logger.info("shard %05d: the source gives no checksum and no validator (strong ETag or "
                        "Last-Modified) to resume against; starting over from byte 0", self.shard_id)
            self._discard()
            self._open_partial()
        start = self.pos
        self.attempts += 1
        body = None
        try:
            fd = open_nofollow(self.partial, os.O_WRONLY | os.O_CREAT)
        except OSError as e:
            raise _DiskError(e) from None
        if self.on_link is not None:
            self.on_link(True)
        try:
            os.lseek(fd, self.pos, os.SEEK_SET)
            try:
                body = self.transport.open(info, start)
                watch.watch(body)
                self._check_stop()
                if body.start != start:         # the whole file came instead of the range
                    self._restart(fd, f"the source sent the file from byte {body.start}, not {start}")
                limit = info.size if info.size is not None else self.policy.max_shard_bytes
                self._stream(body, fd, limit)
                if info.size is None and self.pos >= limit and body.more():
                    raise Fatal(f"the body is larger than the per-shard cap of {limit} bytes "
                                f"(FetchPolicy.max_shard_bytes)")
                self._check_stop()
                if info.size is None or self.pos >= info.size:
                    body.done()
            except Retry as e:
                self._check_stop()              # a stop aborts the read: that is no failure
                if e.progressed is None:
                    e.progressed = self.pos > start
                raise
            self._check_stop()
            if info.size is not None and self.pos < info.size:
                raise Retry(f"connection ended after {self.pos} of {info.size} bytes", progressed=self.pos > start)
        finally:
            watch.unwatch()
            if body is not None:
                body.close()
            os.close(fd)
            if self.on_link is not None:
                self.on_link(False)

    def _stream(self, body, fd, limit):
        """The hot loop: read from the socket into a 1 MiB buffer, writing each read to the partial file at
        once (a kill or a drop loses nothing received), and hand the full buffer to the hashing thread.
        on_bytes hears of bytes when a read drains the socket, else every BYTES_REPORT bytes or
        BYTES_REPORT_SECONDS. A transfer slower than
        low_speed_limit for low_speed_time seconds is abandoned (a Retry that counts as a failure), so a
        trickle cannot hold a shard forever."""
        read, body_left = body.readinto, body.length
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
                        raise Retry(f"too slow: {rate:.0f} bytes/s over the last {now - window_t:.0f} s, under "
                                     f"the floor of {floor} bytes/s (FetchPolicy.low_speed_limit); resuming on "
                                     f"a new connection", progressed=False)
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
        if info.md5 is not None:
            got = _md5_file(self.partial)
            if got != info.md5.lower():
                raise _Corrupt(f"{self.partial}: md5 {got} does not match the source's {info.md5}")
        checked = "sha256" if info.sha256 else "md5" if info.md5 else "size"
        if self.policy.verify_parquet:
            try:
                check_parquet(self.partial)
                if self.policy.verify == "decode":
                    decode_parquet(self.partial)
            except CorruptShardError as e:
                if info.sha256 is not None or info.md5 is not None:    # the source's own bytes: a new
                    self._discard()                                     # download cannot help
                    raise Fatal(f"the source's file is not a valid shard: {e}") from None
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
            raise Fatal(str(e)) from None
        except OSError as e:
            self._discard()
            raise _DiskError(e) from None
        _remove(_sidecar(self.partial))
        _remove(_legacy_sidecar(self.partial))
        if self.policy.fsync:
            try:
                _fsync_dir(self.final.parent)
            except OSError as e:
                raise _DiskError(e) from None

