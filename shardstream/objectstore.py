"""S3, Google Cloud Storage and local folders as shard sources, through fsspec: list a folder, stat a
shard, and read byte ranges into fetch's partial files, with the same resume, verify and budget as HTTP.

    infos = list_folder("s3", "s3://bucket/corpus", storage_options)   # {file name: RemoteInfo}
    info = stat_shard(source, 7)                                       # what the store says now

s3:// needs s3fs (`pip install 'shardstream[s3]'`), gs:// needs gcsfs (`pip install 'shardstream[gcs]'`);
credentials and endpoints come the usual way (AWS_* / AWS_ENDPOINT_URL, GOOGLE_APPLICATION_CREDENTIALS)
or from the Source's storage_options, which go to fsspec as they are.

What each store's metadata becomes (RemoteInfo):
    size    always (from the listing and from the stat)
    etag    S3's ETag, GCS's generation, a local file's mtime and size: matches partial files to the
            object they belong to, and shows a changed object (Source.check_pinned)
    md5     S3's ETag when it is the MD5 of the bytes (single-part upload, not SSE-KMS / SSE-C, asked
            of HeadObject), GCS's md5Hash: checked after the download, like the Hub's sha256
The transport (ObjectTransport, see transport.py; fetch.py runs the transfer) reads the object in blocks
of BLOCK_CHUNKS x chunk_bytes with cat_file(start=, end=) on a helper thread, one block ahead of the
writer. A block that does not come within stall_timeout is a stall: the try is retried from the bytes on
disk with half the block size. The object is stat'ed again before a resume and after its last block: a
changed version is never spliced. An abort (stop) returns within ~0.1 s; the helper thread is left to
finish its call and its bytes dropped.
"""
import asyncio
import base64
import functools
import importlib
import importlib.util
import logging
import queue
import re
import threading

from .errors import ConfigError, TransientFetchError
from .source import RemoteInfo, redact_url
from .transport import Body, Fatal, Retry

logger = logging.getLogger(__name__)

WATCH_POLL = 0.1                # seconds between looks at a block queue (so an abort is seen soon)
BLOCK_CHUNKS = 8                # a ranged read is this many FetchPolicy.chunk_bytes (8 MiB by default)
EXTRAS = {"s3": ("s3fs", "s3"), "gs": ("gcsfs", "gcs")}      # kind -> (module, pip extra)
MD5_RE = re.compile(r"^[0-9a-f]{32}$")


@functools.cache
def transient_errors():
    """What a dropped, refused or timed-out connection raises from fsspec and the store's client. Looked
    up on first use, so that importing this module (every fetch does) does not import aiohttp or botocore."""
    errors = [OSError, TimeoutError, asyncio.TimeoutError]
    for module, names in (("fsspec.exceptions", ("FSTimeoutError",)), ("botocore.exceptions", ("BotoCoreError",)),
                          ("aiohttp", ("ClientError",)), ("google.auth.exceptions", ("TransportError",))):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        errors += [getattr(mod, n) for n in names if hasattr(mod, n)]
    return tuple(errors)


# -----------------------------------------------------------------------------
# The filesystem of a source, and what it says about a file

def filesystem(url, storage_options=None):
    """(fsspec filesystem, path within it) for an s3://, gs:// or file:// URL. ConfigError naming the
    extra to install when the store's fsspec package is missing."""
    scheme = url.split("://", 1)[0]
    if scheme in EXTRAS and importlib.util.find_spec(EXTRAS[scheme][0]) is None:
        module, extra = EXTRAS[scheme]
        raise ConfigError(f"source {redact_url(url)!r} needs {module}: pip install 'shardstream[{extra}]' "
                          f"(or pip install {module})")
    try:
        import fsspec
    except ImportError:
        raise ConfigError(f"source {redact_url(url)!r} needs fsspec: pip install fsspec") from None
    try:
        return fsspec.core.url_to_fs(url, **(storage_options or {}))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"source {redact_url(url)!r}: bad storage options ({e})") from None


def remote_info_of(kind, entry):
    """RemoteInfo from one fsspec listing/info entry (a dict) of a store of `kind` (see the docstring).
    For S3 the md5 comes from HeadObject only (stat_shard), since a listing does not say whether the
    ETag is an MD5."""
    size = entry.get("size")
    try:
        size = int(size) if size is not None and not isinstance(size, bool) else None
    except (TypeError, ValueError):
        raise ConfigError(f"the store listed {entry.get('name')!r} with size {size!r}, not a number of bytes: "
                          f"the listing is malformed") from None
    if kind == "s3":
        etag = entry.get("ETag") or entry.get("etag") or None
        return RemoteInfo(size=size, sha256=None, etag=etag)
    if kind == "gs":
        md5 = entry.get("md5Hash")
        md5 = base64.b64decode(md5).hex() if md5 else None
        etag = entry.get("generation") or entry.get("etag")
        return RemoteInfo(size=size, sha256=None, etag=str(etag) if etag is not None else None, md5=md5)
    mtime = entry.get("mtime")
    return RemoteInfo(size=size, sha256=None, etag=f"{mtime!r}-{size}" if mtime is not None else None)


def _s3_md5(head):
    """The MD5 in a HeadObject answer's ETag, or None when the ETag is not one (multipart, KMS, SSE-C)."""
    etag = (head.get("ETag") or "").strip('"').lower()
    if head.get("ServerSideEncryption", "").startswith("aws:kms") or head.get("SSECustomerAlgorithm"):
        return None
    return etag if MD5_RE.match(etag) else None


def list_folder(kind, url, storage_options=None, recursive=False):
    """{name below the folder at url: RemoteInfo} of the files directly in it, or with recursive at any
    depth (fsspec's find; names are then paths like "sample/10BT/000_00000.parquet"). ConfigError when the
    folder is not there or not readable, or when the listing names a file twice; TransientFetchError when
    the store fails. A name that is no safe path is left for the caller to refuse."""
    fs, path = filesystem(url, storage_options)
    try:
        fs.invalidate_cache(path)
        if recursive:
            if not fs.isdir(path):
                raise FileNotFoundError(path)
            found = fs.find(path, detail=True)
            entries = list(found.values()) if isinstance(found, dict) else []
        else:
            entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        raise ConfigError(f"source {redact_url(url)!r}: no such folder (check the bucket and prefix)") from None
    except PermissionError as e:
        raise ConfigError(f"source {redact_url(url)!r}: not allowed to list it ({e}): check the credentials "
                          f"(AWS_* variables, GOOGLE_APPLICATION_CREDENTIALS) or storage_options") from None
    except NotADirectoryError:
        raise ConfigError(f"source {redact_url(url)!r} is a file, not a folder of shards") from None
    except TypeError as e:              # s3fs/gcsfs make their client on first use
        raise ConfigError(f"source {redact_url(url)!r}: bad storage options ({e})") from None
    except transient_errors() as e:
        raise TransientFetchError(f"source {redact_url(url)!r}: listing failed ({type(e).__name__}: {e})",
                                  url=redact_url(url), cause=str(e)) from None
    prefix = path.rstrip("/") + "/"
    out = {}
    for e in entries:
        if not isinstance(e, dict) or e.get("type") != "file":
            continue
        full = str(e.get("name", "")).rstrip("/")
        # the name below the listed folder, whole: the caller refuses one that is not what it expects
        name = full[len(prefix):] if full.startswith(prefix) else full.lstrip("/").removeprefix(path.lstrip("/") + "/")
        if name in out:
            raise ConfigError(f"source {redact_url(url)!r}: the listing names {name!r} twice: a listing that "
                              f"contradicts itself is not trusted")
        out[name] = remote_info_of(kind, e)
    return out


def stat_shard(source, shard_id):
    """What the store says about shard_id now (fetch._probe calls this instead of a HEAD). Raises
    Fatal for a missing or forbidden object, Retry for a failure worth retrying."""
    url = source.url(shard_id)
    fs, path = filesystem(url, source.storage_options)
    try:
        if source.kind == "s3":         # HeadObject itself: it says whether the ETag is an MD5
            bucket, key, _ = fs.split_path(path)
            head = fs.call_s3("head_object", Bucket=bucket, Key=key)
            return RemoteInfo(size=int(head["ContentLength"]), sha256=None, etag=head.get("ETag"),
                              md5=_s3_md5(head))
        fs.invalidate_cache(path)
        return remote_info_of(source.kind, fs.info(path))
    except Exception as e:
        raise _classify(e, "stat") from None


def _classify(e, what):
    """A store's exception as the outcome of one try: Fatal, Retry, or e itself (a bug)."""
    if isinstance(e, FileNotFoundError):
        return Fatal(f"{what}: the object does not exist at this source")
    if isinstance(e, PermissionError):
        return Fatal(f"{what}: not authorized ({e}): check the store's credentials (AWS_* variables, "
                      f"GOOGLE_APPLICATION_CREDENTIALS) or storage_options")
    if isinstance(e, transient_errors()):
        return Retry(f"{what} failed: {type(e).__name__}: {e}")
    return e


# -----------------------------------------------------------------------------
# The transport: ranged reads instead of a GET

class _Stalled(Exception):
    pass


class _BlockReader:
    """Reads [start, end) of one object in blocks on a helper thread, one block ahead of the caller."""

    def __init__(self, fs, path, start, end, block):
        self.blocks = queue.Queue(maxsize=1)
        self.cancelled = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(fs, path, start, end, block),
                                       name="objectstore-read", daemon=True)
        self.thread.start()

    def _run(self, fs, path, pos, end, block):
        while pos < end and not self.cancelled.is_set():
            try:
                data = fs.cat_file(path, start=pos, end=min(end, pos + block))
            except BaseException as e:      # handed to the caller, who decides
                self._put(e)
                return
            self._put(data)
            if not data:
                return
            pos += len(data)

    def _put(self, item):
        while not self.cancelled.is_set():
            try:
                self.blocks.put(item, timeout=WATCH_POLL)
                return
            except queue.Full:
                continue

    def next(self, timeout, stop):
        """The next block (b"" at the object's end), None when stop is set; raises what the read raised,
        or _Stalled when nothing came within timeout seconds."""
        waited = 0.0
        while True:
            if stop is not None and stop.is_set():
                return None
            try:
                item = self.blocks.get(timeout=WATCH_POLL)
            except queue.Empty:
                waited += WATCH_POLL
                if waited >= timeout:
                    raise _Stalled() from None
                continue
            if isinstance(item, BaseException):
                raise item
            return item

    def close(self):
        self.cancelled.set()        # not joined: a read in flight finishes (or times out) on its own


class ObjectTransport:
    """One fetch call's store side (transport.py): a stat for what the object is, ranged reads for its
    bytes. Ranged reads are separate requests, so the object must still be the version the bytes kept
    belong to (its ETag / generation / mtime): it is stat'ed again before a resume and after the last
    block, and a change is a Retry(reprobe=True)."""

    def __init__(self, source, shard_id, policy, session=None):
        self.source, self.shard_id, self.policy = source, shard_id, policy
        self.url = source.url(shard_id)
        self.block = policy.chunk_bytes * BLOCK_CHUNKS
        self.info = None

    def probe(self):
        return stat_shard(self.source, self.shard_id)

    def can_resume(self, info):
        return True                     # the version is checked again before the bytes are continued

    def open(self, info, start):
        if info.size is None:
            raise Fatal("the store gave no size for the object")
        self.info = info
        if start > 0:
            self.check_same_object(f"before resuming at byte {start}")
        fs, path = filesystem(self.url, self.source.storage_options)
        return ObjectBody(self, _BlockReader(fs, path, start, info.size, self.block), start, info.size)

    def check_same_object(self, when):
        now = stat_shard(self.source, self.shard_id)
        info = self.info
        if info.etag is not None and now.etag != info.etag or now.size != info.size:
            raise Retry(f"the object changed ({when}): version {now.etag}, size {now.size}; starting over",
                        reprobe=True)


class ObjectBody(Body):
    """The blocks of [start, size) as one stream of bytes."""

    def __init__(self, transport, reader, start, size):
        self.transport, self.reader, self.start, self.size = transport, reader, start, size
        self.length = size - start
        self.pos = start
        self.buf = memoryview(b"")
        self.aborted = threading.Event()

    def readinto(self, mv):
        t = self.transport
        while not self.buf:
            if self.pos >= self.size:
                return 0
            try:
                data = self.reader.next(t.policy.stall_timeout, self.aborted)
            except _Stalled:
                t.block = max(t.policy.chunk_bytes, t.block // 2)
                raise Retry(f"no data for {t.policy.stall_timeout:g}s (next reads: {t.block} bytes)") from None
            except Exception as e:
                raise _classify(e, "read") from None
            if data is None:            # aborted: the transfer stops
                return 0
            if not data:                # shorter than it said: ask again (a change is then named)
                raise Retry(f"the object ended at byte {self.pos}, not {self.size}", reprobe=True)
            self.buf = memoryview(data)[:self.size - self.pos]
        n = min(len(mv), len(self.buf))
        mv[:n] = self.buf[:n]
        self.buf = self.buf[n:]
        self.pos += n
        return n

    def done(self):
        self.transport.check_same_object("after reading it")   # blocks read across a change would splice

    def abort(self):
        self.aborted.set()

    def close(self):
        self.reader.close()
