"""A local shard server that behaves like the HuggingFace Hub, and misbehaves on demand.

Serves the files of one directory over real HTTP/1.1 (threaded, keep-alive) for tests, benchmarks and
the offline demo:

    with ShardServer("/tmp/sample", rate=50) as srv:       # 50 MB/s shared by all connections
        srv.url        # http://127.0.0.1:PORT            files at /<file>
        srv.hub_url    # http://127.0.0.1:PORT/datasets/karpathy/climbmix-400b-shuffle/resolve/main
        srv.add_fault(Fault("reset", file="shard_00001.parquet", at=0.5))
        srv.stats("shard_00001.parquet").bytes_sent

What it speaks: GET and HEAD for `/<file>` and for the Hub's `/datasets/<org>/<name>/resolve/<rev>/<file>`;
a single `Range` (206 + Content-Range; 416 + `Content-Range: bytes */size` when unsatisfiable; several
ranges are ignored and the whole file is sent, as RFC 9110 allows); `If-Range` with the ETag;
`ETag` (the quoted sha256 of the file, strong); `Content-Length`; `Accept-Ranges: bytes`. Hub paths also
carry `X-Linked-Size` and `X-Linked-Etag: "<sha256 hex>"` on HEAD and GET, as the Hub does on its resolve
URLs. A path outside the directory is refused with 403; another repo under /datasets/ gets 404.
With token="..." every file request must carry `Authorization: Bearer <token>` (else 401).
The Hub's API for sources (`hf://` URLs): `/api/datasets/<org>/<name>/revision/<rev>` (the commit sha) and
`/api/datasets/<org>/<name>/tree/<rev>[/<dir>]` (path, size, LFS sha256; paged with a Link header; a bad
`cursor` gets 400 with a JSON `{"error": ...}`, as the Hub answers).
`srv.revision` is the one commit served: `main` and that sha resolve, any other revision gets 404; assign
a new sha (and change the files) to play a new commit of the data.

Counters: `stats(name)` -> FileStats(requests, get_requests, head_requests, bytes_sent, ranges, faults)
per file (name relative to the directory, the same for both URL forms); `ranges` are the spans sent,
(start, stop) with stop exclusive. Bytes are counted before they go out, so a client that has read a
response always finds it counted. `requests` logs RequestRecord(method, path, headers, status) of every
request; `reset_stats()` clears both. `GET /_stats` returns them as JSON (for `shardstream serve`).

Bandwidth: one token bucket (MB/s, 1 MB = 10**6 bytes) shared by all connections; `set_rate(None)` lifts
it. `per_connection_rate=` (MB/s; `set_per_connection_rate`, `shardstream serve --per-connection-mb-per-s`)
also caps each connection on its own, as CDNs do: one connection then cannot fill the link, several can
(up to the shared cap). Uncapped, unfaulted bodies go out with sendfile, so serving is not the bottleneck.

Faults (`Fault`, `add_fault`, or the `faults=` spec string of `shardstream serve --faults`). Kinds:
    reset         send `at` of the body, then close abruptly (TCP RST)
    status        reply `status` (e.g. 500/502/503) with a small body
    429           reply 429 with `Retry-After: retry_after`
    stall         send `at` of the body, send nothing for `seconds`, then close
    truncate      promise the full Content-Length, send `at` of the body, close cleanly
    flip          send the full body with one byte flipped, at fraction `at` of the body sent
    404           reply 404 as if the file were missing
    wrong_length  promise a Content-Length 1,024 bytes larger than the body, send the body, close
`at` is a fraction of the body this response sends (of the range, for a Range request). A fault hits
requests whose file name matches the `file` glob, `times` times (None = forever), then is spent. By
default faults hit GET only, except `status`, `429` and `404`, which hit HEAD too; `method=` overrides.
Faults are checked in the order added; the first live match applies.

Fault spec grammar (for the CLI): faults separated by ";", each `kind[:key=value]...` with keys
file, times (an int, or inf/none = forever), at, status, retry_after, seconds, method. Example:
    "reset:file=shard_00001.parquet:at=0.5:times=2;status:status=503:times=3;stall:seconds=5"

A client that hangs up (mid-body, or resetting a kept-alive connection) costs its connection only: one
log line (INFO with `log_hangups` set, as `shardstream serve` does; DEBUG otherwise), never a traceback.

`outage(seconds)`: for that long every new connection and every new request is closed without a response
(a server that is down), then it serves again.
"""
import argparse
import fnmatch
import hashlib
import http.server
import json
import logging
import os
import signal
import socket
import struct
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from email.utils import formatdate
from pathlib import Path
from urllib.parse import unquote, urlsplit

from .errors import ConfigError
from .units import positive_number

logger = logging.getLogger(__name__)

DEFAULT_HUB_REPO = "karpathy/climbmix-400b-shuffle"
FAULT_KINDS = ("reset", "status", "429", "stall", "truncate", "flip", "404", "wrong_length")
HEAD_FAULT_KINDS = ("status", "429", "404")      # the kinds that hit HEAD by default
WRONG_LENGTH_EXTRA = 1024
CHUNK = 1 << 20                                   # buffered body writes


# -----------------------------------------------------------------------------
# Faults

@dataclass(frozen=True)
class Fault:
    """One scripted misbehaviour. See the module docstring for the kinds."""
    kind: str
    file: str = "*"                 # glob on the file name (path relative to the served dir)
    times: int | None = 1           # how many requests it hits; None = forever
    at: float = 0.5                 # fraction of the body after which it strikes
    status: int = 503               # for kind "status"
    retry_after: float = 1          # for kind "429" (seconds)
    seconds: float = 5.0            # for kind "stall"
    method: str | None = None       # "GET", "HEAD" or "*"; None = the kind's default

    def __post_init__(self):
        if self.kind not in FAULT_KINDS:
            raise ConfigError(f"unknown fault kind {self.kind!r}: choose one of {', '.join(FAULT_KINDS)}")
        if self.times is not None and (not isinstance(self.times, int) or self.times < 1):
            raise ConfigError(f"fault {self.kind}: times must be an int >= 1 or None (forever), got {self.times!r}")
        if not 0.0 <= self.at <= 1.0:
            raise ConfigError(f"fault {self.kind}: at must be a fraction in [0, 1], got {self.at!r}")
        if not 100 <= int(self.status) <= 599:
            raise ConfigError(f"fault {self.kind}: status must be an HTTP status 100..599, got {self.status!r}")
        if self.seconds < 0 or self.retry_after < 0:
            raise ConfigError(f"fault {self.kind}: seconds and retry_after must be >= 0")
        if self.method not in (None, "GET", "HEAD", "*"):
            raise ConfigError(f"fault {self.kind}: method must be GET, HEAD or *, got {self.method!r}")

    def hits(self, method, name):
        methods = self.method or ("*" if self.kind in HEAD_FAULT_KINDS else "GET")
        return (methods == "*" or methods == method) and fnmatch.fnmatchcase(name, self.file)


_FAULT_CASTS = {"file": str, "times": int, "at": float, "status": int, "retry_after": float,
                "seconds": float, "method": str.upper}


def parse_faults(spec):
    """Parse a fault spec string (grammar in the module docstring) into a list of Fault."""
    faults = []
    for part in (p.strip() for p in spec.split(";")):
        if not part:
            continue
        kind, *pairs = part.split(":")
        kwargs = {}
        for pair in pairs:
            key, eq, value = pair.partition("=")
            key = key.strip().replace("-", "_")
            if not eq or key not in _FAULT_CASTS:
                raise ConfigError(f"bad fault spec {part!r}: expected key=value with key one of "
                                  f"{', '.join(_FAULT_CASTS)}, got {pair!r}")
            value = value.strip()
            if key == "times" and value.lower() in ("inf", "none", "forever"):
                kwargs[key] = None
                continue
            try:
                kwargs[key] = _FAULT_CASTS[key](value)
            except ValueError:
                raise ConfigError(f"bad fault spec {part!r}: {key}={value!r} is not a valid "
                                  f"{_FAULT_CASTS[key].__name__}") from None
        faults.append(Fault(kind.strip(), **kwargs))
    return faults


# -----------------------------------------------------------------------------
# Counters

@dataclass
class FileStats:
    """What went over the wire for one file. `ranges` are the byte spans actually sent, as
    (start, stop) with stop exclusive, so sum(stop - start) == bytes_sent."""
    requests: int = 0
    get_requests: int = 0
    head_requests: int = 0
    bytes_sent: int = 0
    ranges: list = field(default_factory=list)
    faults: int = 0                 # requests a fault struck


@dataclass(frozen=True)
class RequestRecord:
    method: str
    path: str
    headers: dict
    status: int | None              # None: closed without a response (outage)


# -----------------------------------------------------------------------------
# Bandwidth

class TokenBucket:
    """One byte budget shared by all connections. rate in bytes/s, None = unlimited.
    Each sender reserves its chunk at once (the bucket may go into debt) and sleeps off the debt, so
    concurrent senders share the rate fairly and a change of rate takes effect within ~50 ms."""

    def __init__(self, rate=None, burst_seconds=0.05):
        self._lock = threading.Lock()
        self.burst_seconds = burst_seconds
        self.rate = rate
        self._tokens = 0.0
        self._last = time.monotonic()

    def set_rate(self, rate):
        with self._lock:
            self.rate = rate
            self._tokens = 0.0
            self._last = time.monotonic()

    def consume(self, n, stop=None):
        with self._lock:
            rate = self.rate
            if rate is None:
                return
            now = time.monotonic()
            self._tokens = min(rate * self.burst_seconds, self._tokens + (now - self._last) * rate)
            self._last = now
            self._tokens -= n
            wait = -self._tokens / rate
        deadline = time.monotonic() + wait
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or self.rate != rate or (stop is not None and stop.is_set()):
                return
            time.sleep(min(left, 0.05))


# -----------------------------------------------------------------------------
# The server

class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128        # many parallel fetchers connect at once

    def __init__(self, addr, handler, owner):
        self.owner = owner
        super().__init__(addr, handler)

    def verify_request(self, request, client_address):
        if self.owner.is_down():
            _abort(request)
            return False
        return True

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if not isinstance(exc, OSError):        # a bug: socketserver's traceback
            return super().handle_error(request, client_address)
        # the client went away between or inside requests (reset, broken pipe): one line
        self.owner._hung_up(f"client {client_address[0]}:{client_address[1]} hung up ({type(exc).__name__}: {exc})")


class ShardServer:
    """Serve `directory` like the Hub. Context manager, or start()/stop()."""

    def __init__(self, directory, host="127.0.0.1", port=0, rate=None, faults=None,
                 hub_repo=DEFAULT_HUB_REPO, token=None, revision=None, per_connection_rate=None):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise ConfigError(f"cannot serve {str(self.directory)!r}: not a directory (make one with "
                              f"`shardstream make-sample DIR`)")
        self.root = self.directory.resolve()
        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
            raise ConfigError(f"port must be 0..65535 (0 picks a free one), got {port!r}")
        if hub_repo.count("/") != 1 or not all(hub_repo.split("/")):
            raise ConfigError(f"hub_repo must look like ORG/NAME, got {hub_repo!r}")
        self.host, self.port, self.hub_repo = host, port, hub_repo
        self.token = token              # when set, requests must carry "Authorization: Bearer <token>"
        # The commit the Hub paths serve: resolve/<rev> and the API answer for "main" and this sha only
        # (the directory holds one commit's files). Assign a new sha to play a new commit of the data.
        self.revision = revision or hashlib.sha1(hub_repo.encode()).hexdigest()
        self.tree_page_size = 1000      # entries per page of the tree API (the rest via a Link header)
        self.log_hangups = False        # True: a client hanging up is an INFO line (shardstream serve), else DEBUG
        self._lock = threading.Lock()
        self._bucket = TokenBucket()
        self.set_rate(rate)
        self.per_connection_rate = None     # bytes/s each connection may send on its own; None: no cap
        self.set_per_connection_rate(per_connection_rate)
        self._faults = []               # [Fault, remaining or None]
        for f in parse_faults(faults) if isinstance(faults, str) else (faults or []):
            self.add_fault(f)
        self._stats = {}
        self.requests = []
        self._hashes = {}               # (path, mtime_ns, size) -> sha256 hex
        self._hash_lock = threading.Lock()
        self._down_until = 0.0
        self._stopping = threading.Event()
        self._conns = set()
        self._httpd = None
        self._thread = None

    # --- lifecycle

    def start(self):
        if self._httpd is not None:
            return self
        self._stopping.clear()
        try:
            self._httpd = _HTTPServer((self.host, self.port), _Handler, self)
        except OSError as e:
            raise ConfigError(f"cannot listen on {self.host}:{self.port}: {e} (pick another --port)") from e
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"shard-server-{self.port}", daemon=True)
        self._thread.start()
        logger.debug("serving %s at %s", self.directory, self.url)
        return self

    def stop(self):
        if self._httpd is None:
            return
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:                 # end keep-alive and in-flight connections
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(timeout=5)
        self._httpd = self._thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def url(self):
        host = self.host if self.host not in ("", "0.0.0.0", "::") else "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def hub_url(self):
        return f"{self.url}/datasets/{self.hub_repo}/resolve/main"

    # --- knobs

    def set_rate(self, mb_per_s):
        """Cap all connections together at mb_per_s (10**6 bytes/s); None lifts the cap."""
        if mb_per_s is not None and not mb_per_s > 0:
            raise ConfigError(f"rate must be > 0 MB/s or None (unlimited), got {mb_per_s!r}")
        self._bucket.set_rate(None if mb_per_s is None else mb_per_s * 1e6)

    @property
    def rate(self):
        r = self._bucket.rate
        return None if r is None else r / 1e6

    def set_per_connection_rate(self, mb_per_s):
        """Cap each connection on its own at mb_per_s (besides the shared cap); None lifts it. Bodies
        already being sent follow the new cap within ~50 ms."""
        if mb_per_s is not None and not mb_per_s > 0:
            raise ConfigError(f"per-connection rate must be > 0 MB/s or None (unlimited), got {mb_per_s!r}")
        self.per_connection_rate = None if mb_per_s is None else mb_per_s * 1e6

    def add_fault(self, fault):
        if isinstance(fault, str):
            for f in parse_faults(fault):
                self.add_fault(f)
            return
        if not isinstance(fault, Fault):
            raise ConfigError(f"add_fault wants a Fault or a spec string, got {fault!r}")
        with self._lock:
            self._faults.append([fault, fault.times])

    def clear_faults(self):
        with self._lock:
            self._faults.clear()

    @property
    def faults(self):
        """The live faults, as (Fault, remaining hits or None for forever)."""
        with self._lock:
            return [(f, n) for f, n in self._faults if n is None or n > 0]

    def outage(self, seconds):
        """Be down for `seconds` from now (returns at once): connections are closed unanswered."""
        with self._lock:
            self._down_until = time.monotonic() + seconds

    def is_down(self):
        return time.monotonic() < self._down_until

    def _hung_up(self, message):
        # our own stop() shuts connections down: that is no client hanging up
        level = logging.INFO if self.log_hangups and not self._stopping.is_set() else logging.DEBUG
        logger.log(level, message)

    # --- counters

    def stats(self, name):
        """A snapshot of the counters of one file (name relative to the served directory)."""
        with self._lock:
            s = self._stats.get(name) or FileStats()
            return FileStats(s.requests, s.get_requests, s.head_requests, s.bytes_sent, list(s.ranges), s.faults)

    def all_stats(self):
        with self._lock:
            names = list(self._stats)
        return {n: self.stats(n) for n in names}

    def reset_stats(self):
        with self._lock:
            self._stats.clear()
            self.requests = []

    def stats_json(self):
        pc = self.per_connection_rate
        return {"url": self.url, "hub_url": self.hub_url, "rate_mb_per_s": self.rate,
                "per_connection_mb_per_s": None if pc is None else pc / 1e6,
                "down": self.is_down(), "requests": len(self.requests),
                "faults": [{**asdict(f), "remaining": n} for f, n in self.faults],
                "files": {n: asdict(s) for n, s in self.all_stats().items()}}

    # --- internals used by the handler

    def _record(self, method, path, headers, status):
        with self._lock:
            self.requests.append(RequestRecord(method, path, headers, status))

    def _count(self, name, method=None, fault=False):
        with self._lock:
            s = self._stats.setdefault(name, FileStats())
            if method is not None:
                s.requests += 1
                if method == "GET":
                    s.get_requests += 1
                elif method == "HEAD":
                    s.head_requests += 1
            if fault:
                s.faults += 1

    def _count_body(self, name, start, n):
        """Count the n bytes a body is about to send, before it goes out, so a client that has read
        the whole body always finds it counted. Returns a ticket for _recount_body."""
        if n <= 0:
            return None
        with self._lock:
            s = self._stats.setdefault(name, FileStats())
            s.bytes_sent += n
            s.ranges.append((start, start + n))
            return s, len(s.ranges) - 1, n

    def _recount_body(self, ticket, sent):
        """The body stopped after `sent` bytes (the client went away): correct the count."""
        if ticket is None or ticket[2] == sent:
            return
        s, i, n = ticket
        with self._lock:
            if i < len(s.ranges):
                start = s.ranges[i][0]
                s.bytes_sent -= n - sent
                s.ranges[i] = (start, start + sent)

    def _take_fault(self, method, name):
        with self._lock:
            for entry in self._faults:
                f, left = entry
                if (left is None or left > 0) and f.hits(method, name):
                    if left is not None:
                        entry[1] = left - 1
                    return f
        return None

    def _sha256(self, path, st):
        key = (str(path), st.st_mtime_ns, st.st_size)
        digest = self._hashes.get(key)
        if digest is None:
            with self._hash_lock:       # one hash at a time; others wait for it rather than redo it
                digest = self._hashes.get(key)
                if digest is None:
                    h = hashlib.sha256()
                    with open(path, "rb") as f:
                        while chunk := f.read(CHUNK):
                            h.update(chunk)
                    digest = self._hashes[key] = h.hexdigest()
        return digest

    def resolve(self, name):
        """The file served under relative name, or None when it is outside the dir / not a file."""
        if "\x00" in name:
            return None
        path = (self.root / name).resolve()
        if path != self.root and self.root not in path.parents:
            return None
        return path


def _abort(sock):
    """Close a socket with a TCP RST instead of an orderly FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "shardstream-server"
    timeout = 120                   # idle keep-alive connections end after this

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.owner = self.server.owner
        self._conn_bucket = TokenBucket()    # this connection's own cap (owner.per_connection_rate)
        with self.owner._lock:
            self.owner._conns.add(self.connection)

    def finish(self):
        with self.owner._lock:
            self.owner._conns.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, format, *args):
        logger.debug("%s %s", self.address_string(), format % args)

    def do_GET(self):
        self._serve("GET")

    def do_HEAD(self):
        self._serve("HEAD")

    # --- one request

    def _serve(self, method):
        owner = self.owner
        headers = dict(self.headers.items())
        url_path = urlsplit(self.path).path
        if owner.is_down():
            owner._record(method, url_path, headers, None)
            self.close_connection = True
            _abort(self.connection)
            return
        self._record = (method, url_path, headers)       # logged by _reply, before anything is sent
        if url_path == "/_stats":
            body = json.dumps(owner.stats_json(), indent=1).encode()
            return self._reply(200, body if method == "GET" else b"", {"Content-Type": "application/json"},
                               length=len(body))
        if url_path.startswith("/api/datasets/"):
            return self._api(method, unquote(url_path), urlsplit(self.path).query)
        name, hub, err = self._file_name(unquote(url_path))
        self._respond(method, name, hub, err)

    def _file_name(self, path):
        """(name relative to the dir, is_hub_path, error status or None)."""
        parts = path.split("/")
        if len(parts) >= 7 and parts[1] == "datasets" and parts[4] == "resolve":
            if f"{parts[2]}/{parts[3]}" != self.owner.hub_repo:
                return "/".join(parts[6:]), True, (404, f"repository not found (this server serves "
                                                       f"{self.owner.hub_repo})")
            if parts[5] not in ("main", self.owner.revision):
                return "/".join(parts[6:]), True, (404, f"revision {parts[5]} not found (this server holds "
                                                       f"{self.owner.revision} only)")
            return "/".join(parts[6:]), True, None
        return path.lstrip("/"), False, None

    def _respond(self, method, name, hub, err):
        owner = self.owner
        if err:
            return self._error(*err)
        if owner.token is not None and self.headers.get("Authorization") != f"Bearer {owner.token}":
            return self._error(401, "missing or wrong bearer token")
        path = owner.resolve(name) if name else None
        if path is None:
            return self._error(403 if name else 404, "path outside the served directory" if name else "no file")
        try:
            st = os.stat(path)
        except OSError:
            st = None
        if st is None or not os.path.isfile(path):
            owner._count(name, method)
            return self._error(404, f"{name} not found")
        owner._count(name, method)
        fault = owner._take_fault(method, name)
        if fault is not None:
            owner._count(name, fault=True)
            logger.debug("fault %s on %s %s", fault.kind, method, name)
            if fault.kind == "404":
                return self._error(404, f"{name} not found (fault)")
            if fault.kind == "status":
                return self._error(fault.status, f"scripted fault {fault.status}")
            if fault.kind == "429":
                ra = fault.retry_after
                return self._error(429, "too many requests (fault)",
                                   {"Retry-After": str(int(ra) if float(ra).is_integer() else ra)})

        size = st.st_size
        etag = f'"{owner._sha256(path, st)}"'
        extra = {"ETag": etag, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream",
                 "Last-Modified": formatdate(st.st_mtime, usegmt=True)}
        if hub:
            extra["X-Linked-Size"] = str(size)
            extra["X-Linked-Etag"] = etag
        start, stop, status = 0, size, 200
        rng = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        if rng is not None and (if_range is None or if_range == etag):
            parsed = _parse_range(rng, size)
            if parsed == "unsatisfiable":
                return self._error(416, f"range {rng} outside 0..{size}", {"Content-Range": f"bytes */{size}"})
            if parsed is not None:
                start, stop = parsed
                status = 206
                extra["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
        length = stop - start
        if fault is not None and fault.kind == "wrong_length":
            length += WRONG_LENGTH_EXTRA
        self._reply(status, None, extra, length=length)
        if method == "HEAD":
            return status
        self._send_body(path, name, start, stop, fault)
        return status

    def _api(self, method, path, query):
        """The Hub API calls sources make, answered as the Hub does (huggingface_hub's HfApi reads them):
        GET /api/datasets/<org>/<name>[/revision/<rev>] -> {"id", "sha", ...} (the commit a revision names);
        GET /api/datasets/<org>/<name>/tree/<rev>[/<dir>][?recursive=true][&expand=true] -> a JSON list of
        {"type": "file", "oid", "size", "path", "lfs": {"oid": sha256, "size", "pointerSize"}} (lfs on
        .parquet files) and {"type": "directory", "oid", "size": 0, "path"}, sorted by path; recursive: every
        entry under <dir> at any depth, else its direct children; expand adds each entry's "lastCommit".
        tree_page_size entries a page, the next page named in a `Link: <...>; rel="next"` header that keeps
        the query (recursive, expand) and sets `cursor`. Errors carry the Hub's X-Error-Code (RepoNotFound,
        RevisionNotFound, EntryNotFound, GatedRepo) so huggingface_hub raises its own error classes.
        Faults whose `file` glob starts with "api/" hit these requests (the name is the path without its
        leading '/', e.g. Fault("429", file="api/*")); other faults never do."""
        owner = self.owner
        parts = path.split("/")                 # '', 'api', 'datasets', org, name, op, rev, dir...
        if len(parts) < 5 or (len(parts) > 5 and parts[5] not in ("revision", "tree")) or \
                (len(parts) > 5 and len(parts) < 7):
            return self._error(404, "unknown API path")
        if f"{parts[3]}/{parts[4]}" != owner.hub_repo:
            return self._error(404, f"repository not found (this server serves {owner.hub_repo})",
                               {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
        if owner.token is not None and self.headers.get("Authorization") != f"Bearer {owner.token}":
            message = f"Access to dataset {owner.hub_repo} is restricted: you must be authenticated to access it."
            return self._error(401, "missing or wrong bearer token",
                               {"X-Error-Code": "GatedRepo", "X-Error-Message": message})
        fault = self._take_api_fault(method, path.lstrip("/"))
        if fault is not None:
            if fault.kind == "429":
                ra = fault.retry_after
                ra = str(int(ra) if float(ra).is_integer() else ra)
                return self._error(429, "too many requests (fault)",
                                   {"Retry-After": ra, "RateLimit": f'"api";r=0;t={ra}',
                                    "RateLimit-Policy": '"fixed window";"api";q=500;w=300'})
            if fault.kind == "404":
                return self._error(404, "not found (fault)")
            return self._error(fault.status, f"scripted fault {fault.status}")
        rev = parts[6] if len(parts) > 6 else "main"
        if rev not in ("main", owner.revision):
            return self._error(404, f"Invalid rev id: {rev}",
                               {"X-Error-Code": "RevisionNotFound", "X-Error-Message": f"Invalid rev id: {rev}"})
        if len(parts) == 5 or parts[5] == "revision":
            return self._json(method, {"id": owner.hub_repo, "sha": owner.revision, "private": False,
                                       "gated": "auto" if owner.token is not None else False})
        params = _api_query(query)
        sub = "/".join(p for p in parts[7:] if p)
        folder = owner.resolve(sub) if sub else owner.root
        if folder is None or not folder.is_dir():
            return self._error(404, f"{sub} is not a folder of this repository",
                               {"X-Error-Code": "EntryNotFound", "X-Error-Message": f"{sub} does not exist"})
        entries = _tree_entries(folder, sub, recursive=params.get("recursive", "").lower() == "true")
        raw = params.get("cursor") or "0"
        cursor = int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 18 else -1
        if not 0 <= cursor <= len(entries):
            return self._json(method, {"error": f"bad cursor {raw[:40]!r}: give the next page's URL from the Link "
                                                f"header (cursor=0..{len(entries)})"}, status=400)
        expand = params.get("expand", "").lower() == "true"
        page, items = entries[cursor:cursor + owner.tree_page_size], []
        for rel, entry_path, is_dir in page:
            if is_dir:
                item = {"type": "directory", "oid": hashlib.sha1(rel.encode()).hexdigest(), "size": 0, "path": rel}
            else:
                st = os.stat(entry_path)
                sha = owner._sha256(Path(entry_path), st)
                item = {"type": "file", "oid": sha[:40], "size": st.st_size, "path": rel}
                if rel.endswith(".parquet"):
                    item["lfs"] = {"oid": sha, "size": st.st_size, "pointerSize": 134}
            if expand:
                item["lastCommit"] = {"id": owner.revision, "title": "Upload data",
                                      "date": "2024-01-01T00:00:00.000Z"}
            items.append(item)
        extra = {}
        if cursor + len(page) < len(entries):
            keep = [kv for kv in query.split("&") if kv and kv.partition("=")[0] != "cursor"]
            q = "&".join(keep + [f"cursor={cursor + len(page)}"])
            extra["Link"] = f'<{owner.url}{urlsplit(self.path).path}?{q}>; rel="next"'
        return self._json(method, items, extra)

    def _take_api_fault(self, method, name):
        """The first live fault for an API request: only those whose file glob starts with "api/"."""
        owner = self.owner
        with owner._lock:
            for entry in owner._faults:
                f, left = entry
                if f.file.startswith("api/") and (left is None or left > 0) and f.hits(method, name):
                    if left is not None:
                        entry[1] = left - 1
                    return f
        return None

    def _json(self, method, obj, extra=None, status=200):
        body = json.dumps(obj).encode()
        self._reply(status, body if method == "GET" else b"", {"Content-Type": "application/json", **(extra or {})},
                    length=len(body))
        return status

    def _error(self, status, message, extra=None):
        body = (message + "\n").encode()
        self._reply(status, body if self.command == "GET" else b"",
                    {"Content-Type": "text/plain; charset=utf-8", **(extra or {})}, length=len(body))
        return status

    def _reply(self, status, body, extra, length):
        self.owner._record(*self._record, status)
        self.send_response(status)
        for k, v in extra.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if body:
            self.wfile.write(body)

    def _send_body(self, path, name, start, stop, fault):
        owner = self.owner
        total = stop - start
        kind = fault.kind if fault is not None else None
        cut = total
        if kind in ("reset", "stall", "truncate"):
            cut = int(total * fault.at)
        flip_at = start + min(int(total * fault.at), total - 1) if kind == "flip" and total else None
        sent = 0
        ticket = owner._count_body(name, start, cut)
        try:
            with open(path, "rb") as f:
                mine = self._conn_bucket
                if mine.rate != owner.per_connection_rate:
                    mine.set_rate(owner.per_connection_rate)
                if kind is None and owner._bucket.rate is None and mine.rate is None:
                    while sent < total:
                        n = self.connection.sendfile(f, start + sent, total - sent)
                        if n == 0:
                            break
                        sent += n
                else:
                    f.seek(start)
                    while sent < cut:
                        if mine.rate != owner.per_connection_rate:
                            mine.set_rate(owner.per_connection_rate)
                        rates = [r for r in (owner._bucket.rate, mine.rate) if r is not None]
                        step = int(min(CHUNK, max(4096, min(rates) * 0.02))) if rates else CHUNK
                        chunk = f.read(min(step, cut - sent))
                        if not chunk:
                            break
                        if flip_at is not None and start + sent <= flip_at < start + sent + len(chunk):
                            i = flip_at - start - sent
                            chunk = chunk[:i] + bytes([chunk[i] ^ 0xFF]) + chunk[i + 1:]
                        mine.consume(len(chunk), owner._stopping)      # this connection's cap, then
                        owner._bucket.consume(len(chunk), owner._stopping)  # the link's
                        if owner._stopping.is_set():
                            break
                        self.wfile.write(chunk)
                        sent += len(chunk)
        except OSError as e:            # the client went away
            owner._hung_up(f"client {self.client_address[0]}:{self.client_address[1]} hung up after {sent:,} of "
                           f"{total:,} bytes of {name} ({type(e).__name__})")
            self.close_connection = True
        finally:
            owner._recount_body(ticket, sent)
        if owner._stopping.is_set():
            self.close_connection = True
            return
        if kind == "reset":
            self.close_connection = True
            _abort(self.connection)
        elif kind == "stall":
            owner._stopping.wait(fault.seconds)
            self.close_connection = True
        elif kind in ("truncate", "wrong_length"):
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_WR)
            except OSError:
                pass


def _api_query(query):
    """The tree API's query parameters ({name: value}, last one wins), percent-decoded."""
    out = {}
    for kv in query.split("&"):
        if kv:
            k, _, v = kv.partition("=")
            out[unquote(k)] = unquote(v)
    return out


def _tree_entries(folder, sub, recursive):
    """[(path relative to the repo, filesystem path, is_dir)] under folder, sorted by path: its children, or
    with recursive everything below it. Hidden names (.git, .shardstream) are left out; a linked folder is
    listed but not walked into (no loops)."""
    out, stack = [], [(folder, sub)]
    while stack:
        here, rel_here = stack.pop()
        for e in os.scandir(here):
            if e.name.startswith("."):
                continue
            rel = f"{rel_here}/{e.name}" if rel_here else e.name
            is_dir = e.is_dir()
            out.append((rel, e.path, is_dir))
            if is_dir and recursive and not e.is_symlink():
                stack.append((e.path, rel))
    return sorted(out)


def _parse_range(header, size):
    """A single 'bytes=a-b' / 'bytes=a-' / 'bytes=-n' -> (start, stop exclusive); None to ignore the
    header (malformed or several ranges: serve the whole file); 'unsatisfiable' for a 416."""
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = (x.strip() for x in spec.strip().partition("-"))
    if not dash:
        return None
    try:
        if first == "":                             # suffix: the last n bytes
            n = int(last)
            if n <= 0 or size == 0:
                return "unsatisfiable"
            return max(0, size - n), size
        start = int(first)
        end = None if last == "" else int(last)
    except ValueError:
        return None
    if start < 0 or (end is not None and end < start):
        return None                                 # invalid spec: ignore it, as RFC 9110 says
    if start >= size:
        return "unsatisfiable"
    return start, size if end is None else min(end + 1, size)


# -----------------------------------------------------------------------------
# CLI

def _port(text):
    """--port: 0..65535."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port: give 0..65535 (0 picks a free one)")
    return port


def _rate(text):
    """--rate: MB/s > 0, finite."""
    return positive_number(text, "a rate in MB/s, e.g. 0.5 (leave it out: no cap)")


def cli(argv):
    p = argparse.ArgumentParser(prog="shardstream serve",
                                description="Serve a directory of shards like the HuggingFace Hub.")
    p.add_argument("directory", help="directory holding shard_XXXXX.parquet files")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=_port, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--rate", type=_rate, default=None, help="bandwidth cap in MB/s shared by all clients")
    p.add_argument("--per-connection-mb-per-s", type=_rate, default=None, metavar="MB_PER_S",
                   help="also cap each connection at this many MB/s (as CDNs do)")
    p.add_argument("--faults", default=None,
                   help='scripted faults, e.g. "reset:file=shard_00001.parquet:at=0.5:times=2;status:status=503"')
    p.add_argument("--hub-repo", default=DEFAULT_HUB_REPO, help="ORG/NAME served under /datasets/.../resolve/")
    args = p.parse_args(argv)
    try:
        srv = ShardServer(args.directory, host=args.host, port=args.port, rate=args.rate, faults=args.faults,
                          hub_repo=args.hub_repo, per_connection_rate=args.per_connection_mb_per_s)
        srv.log_hangups = True
        srv.start()
    except ConfigError as e:
        print(f"shardstream serve: {e}", file=sys.stderr)
        return 2
    stop = threading.Event()        # Ctrl-C or SIGTERM (a supervisor) stop it cleanly, whenever they come
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with srv:
        n = sum(len(files) for _, _, files in os.walk(srv.directory))      # nested folders too (a FineWeb tree)
        print(f"serving {n} files from {srv.directory}")
        print(f"  plain:  {srv.url}/<file>")
        print(f"  hub:    {srv.hub_url}/<file>")
        print(f"  as the Hub: export HF_ENDPOINT={srv.url}; then source hf://datasets/{srv.hub_repo}")
        print(f"  stats:  {srv.url}/_stats")
        if srv.rate:
            print(f"  rate cap: {srv.rate:g} MB/s (all connections together)")
        if srv.per_connection_rate:
            print(f"  per-connection cap: {srv.per_connection_rate / 1e6:g} MB/s")
        for f, _ in srv.faults:
            print(f"  fault: {f}")
        print("Ctrl-C to stop", flush=True)
        while not stop.wait(0.5):
            pass
        print("stopped", flush=True)
    return 0
