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
   A big shard may be split (FetchPolicy.max_connections, min_part_bytes; aria2's --split idea): parts
   of it come over concurrent Range requests, each pwrite()n at its offset into the one preallocated
   partial, whose sidecar records the spans on disk (so a resume, also after kill -9, asks only for the
   rest). Every part carries If-Range and has its validators checked; a changed file seen by any part
   restarts the shard. A failed part is retried alone. "auto" starts with one connection and adds
   parts while each step measurably raises the shard's rate (a per-connection cap, as CDNs have). The
   decisions are pure functions: plan_parts, steal_point, auto_parts. The sha256 of a split fetch is
   taken by reading the file back as its contiguous prefix grows.
5. Verify: byte count == size, sha256 / md5 when the source gives one, parquet footer with a `text`
   column (FetchPolicy.verify="decode": every page decoded too). A bad file is deleted and fetched again;
   a size/checksum that never matches becomes PermanentFetchError. FetchResult.checked says what vouched
   for it; a source without checksums is said once at WARNING (FetchPolicy.require_checksum refuses it).
6. fsync the file, rename it to its final name, fsync the directory (a failed commit removes the partial).
   Writeback is started while the bytes arrive (sync_file_range every WRITEBACK_BYTES), so the fsync
   has little left: measured at 8 parallel shards of 20-100 MB, a durable commit per shard costs
   ~1-3 % against fsync=False (bench/fetch.py --size real), so every shard is still made durable alone.

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
                     SchemaError, SourceUnreachable, TransientFetchError, UnsafePathError)
from .httptransport import HttpTransport
from .parts import (AUTO_MAX_CONNECTIONS, AUTO_WINDOW, Verdict, auto_parts, judged_parts, merge_spans, plan_parts,
                    remembered_parts, steal_point)
from .objectstore import ObjectTransport
from .safefs import check_own_file, check_shard_name, ensure_book_dir, fopen_nofollow, open_nofollow
from .shards import shard_name
from .source import OBJECT_STORE_KINDS, hf_endpoint, redact_url, url_origin
from .transport import Fatal, Retry, scrub
from .verify import check_parquet, decode_parquet, sha256_file, verify_shard

logger = logging.getLogger(__name__)

LOCK_POLL = 0.25            # seconds between checks of `stop` while waiting for another fetcher's lock
WATCH_POLL = 0.1            # seconds between checks of `stop` while a transfer is in flight
VERIFY_LEVELS = ("footer", "decode")
UNREACHED_TRIES = 3         # a server that never answered: say so after this many tries...
UNREACHED_SECONDS = 8.0     # ...or this long, whichever comes first (and go on retrying)
MAX_CONNECTIONS = 16        # parts of one shard at once, at most (FetchPolicy.max_connections)
PART_TICK = 0.1             # the split fetch's coordinator wakes this often (progress, hash, checkpoints)
CHECKPOINT_SECONDS = 1.0    # a split fetch records its finished spans in the sidecar this often


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
    max_connections: int | str = "auto"   # concurrent Range requests (parts) for one shard: 1 never splits;
                                      # n splits a big shard into n parts at once; "auto" starts with one
                                      # and adds parts (up to AUTO_MAX_CONNECTIONS) while each added part
                                      # measurably raises the shard's rate (a per-connection cap)
    min_part_bytes: int = 8 << 20     # no part smaller than this: a shard under 2x it stays one request
    text_column: str = "text"         # the column verify_parquet checks (the run's --text-column)
    process: bool | str = "auto"      # run the transfer in a helper process (fetchproc.py), out of the
                                      # caller's interpreter lock: True always (waits for it to start),
                                      # False never, "auto" for shards of min_process_bytes or more once
                                      # the helper is up (a downloader's or download_shards' only)
    min_process_bytes: int = 16 << 20

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
        if not (self.max_connections == "auto" or (isinstance(self.max_connections, int)
                                                   and not isinstance(self.max_connections, bool)
                                                   and 1 <= self.max_connections <= MAX_CONNECTIONS)):
            raise ConfigError(f"FetchPolicy.max_connections must be \"auto\" or 1..{MAX_CONNECTIONS}, "
                              f"got {self.max_connections!r}")
        if not (isinstance(self.min_part_bytes, int) and self.min_part_bytes >= 64 << 10):
            raise ConfigError(f"FetchPolicy.min_part_bytes must be an int >= 65536, got {self.min_part_bytes!r}")
        if self.process not in (True, False, "auto"):
            raise ConfigError(f"FetchPolicy.process must be True, False or \"auto\", got {self.process!r}")
        if self.process != "auto":
            object.__setattr__(self, "process", bool(self.process))     # 1 and 0 read as True and False
        if not (isinstance(self.min_process_bytes, int) and self.min_process_bytes >= 0):
            raise ConfigError(f"FetchPolicy.min_process_bytes must be an int >= 0, got {self.min_process_bytes!r}")
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
    """While a transfer runs, watch `stop`; when it is set, abort the live bodies (their reads return).
    A split fetch has one body per part in flight. One watchdog thread serves every transfer of the
    process (started when the first registers, gone when the last leaves): a wake-up every WATCH_POLL,
    not one per transfer, so eight fetches do not take the GIL from the trainer eight times as often."""
    _watches = set()
    _watch_lock = threading.Lock()
    _thread = None                  # (thread, its exit event) while any transfer is watched

    def __init__(self, stop):
        self.stop = stop
        self.bodies = set()
        self.lock = threading.Lock()
        if stop is not None:
            cls = _StopWatch
            with cls._watch_lock:
                cls._watches.add(self)
                if cls._thread is None:
                    done = threading.Event()
                    cls._thread = (threading.Thread(target=cls._run, args=(done,), name="fetch-stopwatch",
                                                    daemon=True), done)
                    cls._thread[0].start()

    @classmethod
    def _run(cls, done):
        while not done.wait(WATCH_POLL):
            with cls._watch_lock:
                watches = list(cls._watches)
            for w in watches:
                if w.stop.is_set():
                    w.abort_all()

    def abort_all(self):
        with self.lock:
            bodies, self.bodies = list(self.bodies), set()
        for body in bodies:
            body.abort()

    def watch(self, body):
        with self.lock:
            self.bodies.add(body)
        if self.stop is not None and self.stop.is_set():
            body.abort()

    def unwatch(self, body=None):
        with self.lock:
            if body is None:
                self.bodies.clear()
            else:
                self.bodies.discard(body)

    def close(self):
        """Leave the watch; the last to leave ends the thread (no thread outlives the transfers)."""
        cls, ending = _StopWatch, None
        with cls._watch_lock:
            cls._watches.discard(self)
            if not cls._watches and cls._thread is not None:
                ending, cls._thread = cls._thread, None
        if ending is not None:
            ending[1].set()
            ending[0].join()


# -----------------------------------------------------------------------------
# Files: data dir, partial + sidecar

class _Verdicts:
    """max_connections="auto"'s findings per origin, for this process (parts.Verdict): the next shards
    start with the part count judged, and skip the split file's costs when it is one connection."""

    def __init__(self):
        self._lock = threading.Lock()
        self._by_origin = {}

    def get(self, origin):
        with self._lock:
            return self._by_origin.get(origin)

    def put(self, origin, verdict):
        with self._lock:
            self._by_origin[origin] = verdict


VERDICTS = _Verdicts()


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


def _write_sidecar(partial, info, spans=None, sync=True):
    """Write partial's sidecar, before the partial itself exists (or, for a split partial, after the
    spans it lists are on disk). No temp file and rename: a sidecar torn by a kill is one whose partial
    never came (swept as an orphan) or does not parse (the partial is discarded) - and a temp file would
    be a name no sweep knows."""
    record = _sidecar_record(info)
    if spans is not None:
        record["spans"] = [list(s) for s in spans]
    with fopen_nofollow(_sidecar(partial), "w") as f:
        json.dump(record, f)
        f.flush()
        if sync:
            os.fsync(f.fileno())


def _sidecar_matches(meta, info):
    """Whether a sidecar belongs to the file info describes (a sidecar without last_modified predates it;
    a split partial's also lists its spans)."""
    want = _sidecar_record(info)
    if isinstance(meta, dict):
        meta = {k: v for k, v in meta.items() if k != "spans"}
        if "last_modified" not in meta:
            want.pop("last_modified")
    return meta == want


def _sidecar_spans(meta, length, size):
    """The spans a split partial's sidecar says are on disk, merged and clipped to the file's length; None
    for a partial that is not split (its bytes are its length). Anything malformed counts as nothing."""
    spans = meta.get("spans") if isinstance(meta, dict) else None
    if spans is None or length is None:
        return None
    ok = isinstance(spans, list) and all(
        isinstance(s, list) and len(s) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in s)
        and 0 <= s[0] <= s[1] for s in spans)
    if not ok:
        return []
    limit = length if size is None else min(length, size)
    return merge_spans((a, min(b, limit)) for a, b in spans if a < limit)


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
BATCH_CHUNKS = 4                  # one connection's reads are written and hashed in batches of this many chunks
BATCH_SECONDS = 0.25              # ...or this often, whichever comes first
HASH_READ = 4 << 20               # a split fetch reads its file back for the sha256 this much at a time...
HASH_STEP = 64 << 20              # ...and at most this much per coordinator tick


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


def _pwrite_all(fd, view, offset):
    try:
        while view:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n
    except OSError as e:
        raise _DiskError(e) from None


class _Part:
    """One span of a split fetch: [start, end) to fetch, [start, pos) on disk. `end` shrinks when a free
    connection takes over the part's tail; pos and end change under the transfer's part lock."""
    __slots__ = ("start", "pos", "end", "reading", "got", "not_before")

    def __init__(self, start, end):
        self.start = self.pos = self.reading = start     # reading: the end of the read in flight
        self.end = end
        self.got = 0                # bytes received for this part (all its tries)
        self.not_before = 0.0       # after a failed try: when it may be tried again (monotonic)


class _Lane:
    """One connection of a split fetch: its session (the caller's for the first), transport and buffer."""

    def __init__(self, transport, session, own, chunk_bytes):
        self.transport, self.session, self.own = transport, session, own
        self.buf = memoryview(bytearray(chunk_bytes * BATCH_CHUNKS))

    def close(self):
        if self.own:
            self.session.close()


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
    shard_name(shard_id)                      # a ConfigError for anything but an int id (never a path)
    name = source.file_name(shard_id)         # shard_XXXXX.parquet, or the manifest's cache name (never a path)
    url = source.url(shard_id)
    data_dir = ensure_data_dir(data_dir)
    source.check_data_dir(data_dir)
    final = data_dir / name
    lock_path = layout.lock_path(data_dir, name)
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
        self.pos = 0                    # bytes in it (one connection: all hashed into self.hasher)
        self.hasher = None
        self.done = []                  # a split partial's spans on disk, as its sidecar records them
        self.split = False              # the partial is preallocated and its sidecar lists its spans
        self.hashed = 0                 # a split fetch: bytes [0, hashed) are in self.hasher
        self.no_parts = False           # the server answered a part with the whole file: one connection
        self._lane0_used = False        # a split fetch's first connection is the caller's session
        self._hash_buf = None           # a split fetch's read-back buffer for the sha256

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
            if self._use_parts():
                self._download_parts(watch)
            else:
                if self.split:          # a split partial cannot be continued by one open-ended GET
                    self._discard()
                    self._open_partial(adopt=False)
                self._download(watch)
        return self._finish()

    def _use_parts(self):
        """Split this fetch into Range requests? Only a transport that asks for spans, a known size, a
        partial it may resume (parts are spliced: each is checked against the same validators), and
        either a split partial to continue or enough bytes left for two parts."""
        info, policy = self.info, self.policy
        if self.no_parts or info.size is None or not getattr(self.transport, "parts", False):
            return False
        if not self.transport.can_resume(info):
            return False
        if self.split:
            return True
        most = AUTO_MAX_CONNECTIONS if policy.max_connections == "auto" else policy.max_connections
        if policy.max_connections == "auto":
            most = remembered_parts(VERDICTS.get(self._origin()), time.monotonic()) or most
        return most > 1 and info.size - self.pos >= 2 * policy.min_part_bytes

    def _origin(self):
        return url_origin(self.url) or self.url

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

    def _open_partial(self, adopt=True):
        """Adopt a partial file whose sidecar matches the remote info (the one with the most bytes),
        delete the others, or start a new one. A split partial's bytes are the spans its sidecar lists
        (clipped to the file's length); any other partial's are its length."""
        d, name, info = self.final.parent, self.final.name, self.info
        best = None
        for p in sorted(d.glob(f"{name}.*.partial")):
            spans = None
            try:
                side = _sidecar(p) if os.path.lexists(_sidecar(p)) else _legacy_sidecar(p)
                with fopen_nofollow(side) as f:
                    meta = json.load(f)
                length = p.lstat().st_size if p.is_file() and not p.is_symlink() else None
                spans = _sidecar_spans(meta, length, info.size)
            except (OSError, ValueError):
                meta, length = None, None
            meta = meta if length is not None else None
            have = length if spans is None else sum(b - a for a, b in spans)
            ok = (adopt and _sidecar_matches(meta, info) and self.transport.can_resume(info)
                  and (info.size is None or (length is not None and length <= info.size)))
            if ok and (best is None or have > best[1]):
                if best is not None:
                    self._remove_partial(best[0])
                best = (p, have, spans)
            else:
                logger.info("shard %05d: deleting partial file %s (stale or superseded)", self.shard_id, p.name)
                self._remove_partial(p)
        for s in layout.book_dir(d).glob(f"{name}.*.partial.json"):     # sidecars whose partial is gone
            if not layout.partial_of_sidecar(s).exists():
                _remove(s)
        for s in d.glob(f"{name}.*.partial.json"):      # an older layout's, beside the partials
            _remove(s)
        self.hasher = hashlib.sha256()
        self.done, self.split, self.hashed = [], False, 0
        if best is not None:
            self.partial, self.pos, spans = best
            if spans is not None:       # hashed once its spans are all in (_download_parts)
                self.done, self.split = spans, True
            else:
                try:
                    sha256_file(self.partial, limit=self.pos, hasher=self.hasher)
                except OSError as e:
                    raise _DiskError(e) from None
                self.hashed = self.pos
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
        self.done, self.split, self.hashed = [], False, 0

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
        """The hot loop, kept lean because it shares the GIL with the training thread: reads of up to
        chunk_bytes land in a batch buffer of BATCH_CHUNKS x chunk_bytes, written to the partial file and
        handed to the hashing thread whole (one write, one hand-off and one on_bytes per batch, not per
        read), or sooner when BATCH_SECONDS have passed (a slow transfer's bytes and progress still show).
        A drop, a stall or a stop writes what the batch holds first, so none of it is lost; a kill -9
        loses at most one batch. A transfer slower than low_speed_limit for low_speed_time seconds is
        abandoned (a Retry that counts as a failure), so a trickle cannot hold a shard forever."""
        read, body_left = body.readinto, body.length
        chunk = self.policy.chunk_bytes
        batch = chunk * BATCH_CHUNKS
        on_bytes, stop = self.on_bytes, self.stop
        floor, window = self.policy.low_speed_limit, self.policy.low_speed_time
        writeback = _sync_file_range if self.policy.fsync else None
        flushed = self.pos
        now = time.monotonic()
        window_t, window_pos = now, self.pos
        batch_t = now
        hashing = _HashThread(self.hasher, batch)
        mv, fill = hashing.free_buffer(), 0
        got = self.pos              # bytes received: self.pos (on disk) + fill

        def flush():
            nonlocal mv, fill
            _write_all(fd, mv[:fill])
            hashing.submit(mv, fill)
            self.pos += fill
            self.bytes_downloaded += fill
            if on_bytes is not None:
                on_bytes(fill)
            mv, fill = hashing.free_buffer(), 0

        try:
            while got < limit and body_left > 0:
                want = min(chunk, batch - fill, limit - got, body_left)
                n = read(mv[fill:fill + want])     # a drop raises: the finally writes what came
                if not n:
                    break
                fill += n
                got += n
                body_left -= n
                now = time.monotonic()
                if fill == batch or now - batch_t >= BATCH_SECONDS:
                    flush()
                    batch_t = now
                    if writeback is not None and self.pos - flushed >= WRITEBACK_BYTES:
                        writeback(fd, flushed, self.pos - flushed, SYNC_FILE_RANGE_WRITE)   # advisory
                        flushed = self.pos
                if window and now - window_t >= window:
                    rate = (got - window_pos) / (now - window_t)
                    if rate < floor:
                        raise Retry(f"too slow: {rate:.0f} bytes/s over the last {now - window_t:.0f} s, under "
                                     f"the floor of {floor} bytes/s (FetchPolicy.low_speed_limit); resuming on "
                                     f"a new connection", progressed=False)
                    window_t, window_pos = now, got
                if stop is not None and stop.is_set():
                    break
        finally:
            try:
                if fill:
                    flush()
            finally:
                hashing.close()     # every byte written is hashed before anyone reads self.hasher

    # --- a split fetch: several Range requests into the one preallocated partial

    def _download_parts(self, watch):
        """Fetch the missing spans of the partial over up to max_connections connections at once, each
        part pwrite()n at its offset (one file, no reassembly). This thread coordinates: it starts parts
        (and gives a free connection the tail of the busiest part, so all end together), hears how each
        try ended (a failed part is retried alone, after a backoff, from its own bytes on disk), reports
        on_bytes, hashes the file's contiguous prefix as it grows, and records the finished spans in the
        sidecar every CHECKPOINT_SECONDS (after an fdatasync when fsync is on), so a kill -9 costs at most
        the bytes of the last second. A changed file seen by any part (Retry reprobe/restart), a Fatal or
        a full disk stops every part and goes to run()'s handling, like a single connection's."""
        info, policy = self.info, self.policy
        size, min_part = info.size, policy.min_part_bytes
        auto = policy.max_connections == "auto"
        most = AUTO_MAX_CONNECTIONS if auto else policy.max_connections
        target = 1 if auto else most
        settled = remembered_parts(VERDICTS.get(self._origin()), time.monotonic()) if auto else None
        if settled:                     # this origin was judged moments ago: start there, judge no more
            target = min(settled, most)
        self._split_partial()
        self._lane0_used = False
        parts = [_Part(a, b) for a, b in plan_parts(size, self.done, target, min_part)]
        pending, running, lanes = list(parts), {}, []
        events, halt, lock = queue.SimpleQueue(), threading.Event(), threading.Lock()
        base_done, base_downloaded = list(self.done), self.bytes_downloaded
        reported = 0
        now = time.monotonic()
        checkpoint_t = now
        rate_before, parts_before, judging, window = None, 1, None, None   # "auto"'s measurement
        frozen = not auto or bool(settled)
        finished = False

        def spans_now():
            with lock:
                return merge_spans(base_done + [(p.start, p.pos) for p in parts])

        def launch(part):
            lane = lanes.pop() if lanes else self._new_lane()
            running[part] = lane
            self.attempts += 1
            threading.Thread(target=self._part_worker, args=(part, lane, watch, halt, lock, events),
                             name=f"fetch-part-{self.shard_id}", daemon=True).start()

        def steal():
            """A new part: the tail of the running part with the most left (None when none may be cut)."""
            with lock:
                busiest = max(running, key=lambda p: p.end - p.pos, default=None)
                cut = None if busiest is None else steal_point(busiest.pos, busiest.end,
                                                               busiest.reading - busiest.pos, min_part)
                if cut is None:
                    return None
                part = _Part(cut, busiest.end)
                busiest.end = cut
                parts.append(part)
            return part

        rfd = wfd = None
        if self.on_link is not None:
            self.on_link(True)
        try:
            rfd = open_nofollow(self.partial, os.O_RDONLY)
            wfd = open_nofollow(self.partial, os.O_WRONLY)
            while True:
                now = time.monotonic()
                while len(running) < target:            # start parts: the waiting ones first
                    ready = [p for p in pending if p.not_before <= now]
                    part = ready[0] if ready else (None if pending else steal())
                    if part is None:
                        break
                    if part in pending:
                        pending.remove(part)
                    launch(part)
                    if auto and judging is None and not frozen:
                        judging = part                  # its first byte opens the next window
                if not running and not pending:
                    self._hash_prefix(rfd, spans_now(), None)     # what the last ticks did not hash
                    finished = True
                    if auto and not settled and rate_before is not None:    # ended while still gaining
                        VERDICTS.put(self._origin(), Verdict(target, now))
                    break
                try:
                    event = events.get(timeout=PART_TICK)
                except queue.Empty:
                    event = None
                if self.stop is not None and self.stop.is_set():    # a stop's aborted reads are no failures
                    if event is not None:
                        lanes.append(running.pop(event[1]))
                    self._check_stop()
                while event is not None:
                    kind, part, what = event
                    lanes.append(running.pop(part))
                    if kind == "retry":
                        if what.reprobe or what.restart:
                            raise what
                        self.failures = 0 if what.progressed else self.failures + 1
                        if policy.max_attempts is not None and self.failures >= policy.max_attempts:
                            raise self._error(TransientFetchError, what.cause)
                        delay = _backoff(policy, self.failures, what.retry_after)
                        cause = scrub(what.cause, self.source.token)
                        logger.info("shard %05d: part %d-%d: %s; resuming it at byte %d in %.1fs", self.shard_id,
                                    part.start, part.end, cause, part.pos, delay)
                        if self.on_retry is not None:
                            self.on_retry(cause)
                        part.not_before = time.monotonic() + delay
                        pending.append(part)
                    elif kind == "whole":               # the server ignores Range: one connection
                        self.no_parts = True
                        raise Retry("the server sent the whole file for a part (it ignores Range); "
                                    "fetching it over one connection", restart=True, progressed=True)
                    elif kind != "ok":
                        raise what
                    try:
                        event = events.get_nowait()
                    except queue.Empty:
                        event = None
                now = time.monotonic()
                got = sum(p.got for p in parts)
                self.bytes_downloaded = base_downloaded + got
                if self.on_bytes is not None and got > reported:
                    self.on_bytes(got - reported)
                    reported = got
                spans = spans_now()
                self._hash_prefix(rfd, spans, HASH_STEP)
                if now - checkpoint_t >= CHECKPOINT_SECONDS:
                    self._checkpoint(wfd, spans)
                    checkpoint_t = now
                if not frozen and judging is not None:  # "auto": judge the newest part count
                    if window is None and judging.got > 0:
                        window = (now, got)
                    elif window is not None and now - window[0] >= AUTO_WINDOW:
                        rate = (got - window[1]) / (now - window[0])
                        more = auto_parts(rate_before, parts_before, rate, target, most)
                        if more > target:
                            logger.debug("shard %05d: %d connections (%.1f MB/s with %d)", self.shard_id,
                                         more, rate / 1e6, target)
                            parts_before, rate_before, target = target, rate, more
                        else:
                            frozen = True
                            VERDICTS.put(self._origin(), Verdict(judged_parts(rate_before, parts_before, rate,
                                                                              target), now))
                            settled = target        # judged and recorded here
                        judging, window = None, None
                        while not frozen and not pending and len(running) < target:
                            part = steal()
                            if part is None:
                                frozen = True           # nothing left big enough to share
                            else:
                                launch(part)
                                judging = part          # the last one started opens the window
        except OSError as e:
            raise _DiskError(e) from None
        finally:
            halt.set()
            watch.abort_all()
            while running:                              # every part's thread has let go of the file
                kind, part, _ = events.get()
                lanes.append(running.pop(part))
            for lane in lanes:
                lane.close()
            got = sum(p.got for p in parts)
            self.bytes_downloaded = base_downloaded + got
            if self.on_bytes is not None and got > reported:
                self.on_bytes(got - reported)
            self.done = spans_now()
            self.pos = sum(b - a for a, b in self.done)
            try:
                if not finished and wfd is not None and self.partial is not None and self.partial.exists():
                    self._checkpoint(wfd, self.done)    # what a resume may keep
            except _DiskError as e:                     # the error on its way out says more
                logger.debug("shard %05d: could not record the spans on disk: %s", self.shard_id, e.err)
            finally:
                for fd in (rfd, wfd):
                    if fd is not None:
                        os.close(fd)
                if self.on_link is not None:
                    self.on_link(False)
        if self.hashed != size:         # cannot be: every span is in and hashed
            raise Retry(f"split fetch ended with {self.hashed} of {size} bytes hashed", restart=True)

    def _split_partial(self):
        """Make the partial a split one: first the sidecar listing the bytes it holds, then its length
        set to the shard's (a kill in between leaves a short file whose listed spans are all there)."""
        try:
            if not self.split:
                self.done = [(0, self.pos)] if self.pos else []
                _write_sidecar(self.partial, self.info, self.done, sync=self.policy.fsync)
            elif os.lstat(self.partial).st_size >= self.info.size:
                return
            fd = open_nofollow(self.partial, os.O_WRONLY)
            try:
                os.ftruncate(fd, self.info.size)        # sparse: blocks come as the parts write them
            finally:
                os.close(fd)
        except UnsafePathError as e:
            raise Fatal(str(e)) from None
        except OSError as e:
            raise _DiskError(e) from None
        self.split = True

    def _new_lane(self):
        if not getattr(self, "_lane0_used", False):
            self._lane0_used = True
            return _Lane(self.transport, None, False, self.policy.chunk_bytes)
        session = requests.Session()
        return _Lane(transport_for(self.source)(self.source, self.shard_id, self.policy, session), session, True,
                     self.policy.chunk_bytes)

    def _checkpoint(self, fd, spans):
        """Record `spans` as on disk: their bytes made durable first (fsync on), then the sidecar."""
        try:
            if self.policy.fsync:
                os.fdatasync(fd)
            _write_sidecar(self.partial, self.info, spans, sync=self.policy.fsync)
        except OSError as e:
            raise _DiskError(e) from None

    def _hash_prefix(self, fd, spans, most):
        """Feed self.hasher the bytes after self.hashed that are on disk without a gap (at most `most` of
        them; None: all), read back from the page cache in big reads (hashlib and pread release the GIL)."""
        end = next((b for a, b in spans if a <= self.hashed <= b), self.hashed)
        if most is not None:
            end = min(end, self.hashed + most)
        if self.hashed < end and self._hash_buf is None:
            self._hash_buf = memoryview(bytearray(HASH_READ))
        buf = self._hash_buf
        while self.hashed < end:
            n = os.preadv(fd, [buf[:min(HASH_READ, end - self.hashed)]], self.hashed)
            if not n:
                raise OSError(errno.EIO, f"{self.partial} is shorter than its spans")
            self.hasher.update(buf[:n])
            self.hashed += n

    def _part_worker(self, part, lane, watch, halt, lock, events):
        """One try of one part, on its own thread: GET [pos, end) and pwrite each read at its offset. How
        it ended goes to the coordinator as ("ok"|"retry"|"whole"|"error", part, detail)."""
        fd = body = None
        start = part.pos
        try:
            fd = open_nofollow(self.partial, os.O_WRONLY)
            with lock:
                end = part.end
            body = lane.transport.open(self.info, start, end)
            watch.watch(body)
            if body.start != start:
                return events.put(("whole", part, None))
            self._stream_part(body, fd, part, lane.buf, halt, lock)
            with lock:
                short = part.pos < part.end
            if short and not halt.is_set():
                raise Retry(f"connection ended at byte {part.pos} of the part {part.start}-{part.end}")
            events.put(("ok", part, None))
        except Retry as e:
            if e.progressed is None:
                e.progressed = part.pos > start
            events.put(("retry", part, e))
        except _DiskError as e:
            events.put(("error", part, e))
        except BaseException as e:      # Fatal, or a bug: the coordinator raises it
            events.put(("error", part, e))
        finally:
            if body is not None:
                watch.unwatch(body)
                body.close()
            if fd is not None:
                os.close(fd)

    def _stream_part(self, body, fd, part, mv, halt, lock):
        """A part's hot loop: reads land in the lane's batch buffer, pwrite()n at the part's offset when it
        is full or BATCH_SECONDS old (and before any exit), then `flushed` advances: the spans recorded
        as on disk are [start, flushed). The part's end is read under the lock before each read, and
        `reading` marks where the bytes received or in flight end, so a tail handed to another
        connection is never written twice. The low-speed rule applies per part; writeback is started as
        in the one-connection loop."""
        policy = self.policy
        # reads of at most a quarter part, so a steal can always cut behind the bytes in hand
        chunk = min(policy.chunk_bytes, max(16 << 10, policy.min_part_bytes // 4))
        batch = min(len(mv), max(chunk, policy.min_part_bytes // 4))
        read, left = body.readinto, body.length
        floor, window = policy.low_speed_limit, policy.low_speed_time
        writeback = _sync_file_range if policy.fsync else None
        synced = part.pos
        now = time.monotonic()
        window_t, window_pos, batch_t = now, part.pos, now
        fill, at = 0, part.pos          # the batch holds [at, at + fill)

        def flush():
            nonlocal fill, at, synced
            _pwrite_all(fd, mv[:fill], at)
            at += fill
            with lock:
                part.pos = at
            part.got += fill
            fill = 0
            if writeback is not None and at - synced >= WRITEBACK_BYTES:
                writeback(fd, synced, at - synced, SYNC_FILE_RANGE_WRITE)     # advisory
                synced = at

        try:
            while not halt.is_set() and left > 0:
                with lock:
                    want = min(chunk, batch - fill, part.end - (at + fill), left)
                    part.reading = at + fill + max(want, 0)     # a steal cuts past it
                if want <= 0:
                    break
                n = read(mv[fill:fill + want])
                if not n:
                    break
                fill += n
                left -= n
                now = time.monotonic()
                if fill == batch or now - batch_t >= BATCH_SECONDS:
                    flush()
                    batch_t = now
                if window and now - window_t >= window:
                    rate = (at + fill - window_pos) / (now - window_t)
                    if rate < floor:
                        raise Retry(f"too slow: {rate:.0f} bytes/s over the last {now - window_t:.0f} s, under "
                                    f"the floor of {floor} bytes/s (FetchPolicy.low_speed_limit); resuming on "
                                    f"a new connection", progressed=False)
                    window_t, window_pos = now, at + fill
        finally:
            if fill:
                flush()

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
                check_parquet(self.partial, text_column=self.policy.text_column)
                if self.policy.verify == "decode":
                    decode_parquet(self.partial)
            except SchemaError as e:                # a readable footer: the file's own schema
                self._discard()
                raise Fatal(f"the source's file is not a valid shard: {e}") from None
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

