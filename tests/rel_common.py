"""Shared parts of the reliability tests (test_fault_matrix, test_kill9, test_diskfull, test_shared_cache,
test_soak, test_security): small real shards, a ShardServer that also faults at random, a loader-style
reader that checks every shard it reads against the source's sha256, and a tally of what was proven.

    shas = make_shards(d, 12)                           # {shard id: sha256 hex} of real parquet shards
    with RandomFaultServer(d, rate=0.1, seed=7) as srv:  # ~10 % of requests get a random fault
        ...
    got = read_shard(path)                              # (sha256 of the bytes, rows read row group by row group)
    tally("fault_matrix/reset", faults=srv.injected(), bytes_verified=n, lost=0)

The tally: when REL_TALLY names a file, every case appends one JSON line to it (case, faults injected,
bytes verified, shards lost), so one run of the suite gives the counts docs/RELIABILITY.md quotes:
    REL_TALLY=/tmp/tally.jsonl .venv/bin/python -m pytest tests/test_fault_matrix.py ... -q
    .venv/bin/python tests/rel_tally.py /tmp/tally.jsonl
"""
import hashlib
import json
import http.server
import os
import random
import threading
import time
from collections import Counter

import pyarrow.parquet as pq

from shardstream.sample import make_sample
from shardstream.server import Fault, ShardServer
from shardstream.shards import shard_name

# Every kind a flaky network or CDN produces that the run must ride out (404 is a missing file, not noise).
NOISE_KINDS = ("reset", "status500", "status502", "status503", "429", "stall", "truncate", "flip", "wrong_length")
HEAD_NOISE_KINDS = ("status500", "status502", "status503", "429")      # the kinds a HEAD can get


def make_shards(directory, n, chars=60_000, seed=1):
    """n real nanochat-layout shards (2 row groups of 16 docs, ~20 KB each); returns {id: sha256 hex}."""
    make_sample(directory, n, chars, seed=seed, docs_per_row_group=16, row_groups=2)
    return {i: sha256_of(directory / shard_name(i)) for i in range(n)}


def sha256_of(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def read_shard(path):
    """Read a shard the way the loader does (row group by row group, the `text` column) and hash its bytes.
    Returns (sha256 hex, rows read)."""
    digest = sha256_of(path)
    pf = pq.ParquetFile(path)
    rows = 0
    for rg in range(pf.num_row_groups):
        rows += len(pf.read_row_group(rg, columns=["text"]).column("text"))
    return digest, rows


def make_fault(kind, rng, *, stall_seconds=2.0):
    """A one-shot Fault of a NOISE_KINDS kind, striking at a random point of the body."""
    at = round(rng.uniform(0.05, 0.95), 3)
    if kind.startswith("status"):
        return Fault("status", status=int(kind[len("status"):]), method="*")
    if kind == "429":
        return Fault("429", retry_after=0, method="*")
    if kind == "stall":
        return Fault("stall", at=at, seconds=stall_seconds)
    return Fault(kind, at=at)


class RandomFaultServer(ShardServer):
    """A ShardServer where, besides the scripted faults, each request gets a random NOISE_KINDS fault with
    probability `fault_rate` (seeded). `injected()` counts them by kind. Everything else is the real server."""

    def __init__(self, directory, *, fault_rate=0.1, seed=0, kinds=NOISE_KINDS, stall_seconds=2.0, **kw):
        super().__init__(directory, **kw)
        self.fault_rate = fault_rate
        self.kinds = tuple(kinds)
        self.stall_seconds = stall_seconds
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        self._injected = Counter()

    def _take_fault(self, method, name):
        scripted = super()._take_fault(method, name)
        if scripted is not None:
            return scripted
        with self._rng_lock:
            if self._rng.random() >= self.fault_rate:
                return None
            kinds = self.kinds if method == "GET" else [k for k in self.kinds if k in HEAD_NOISE_KINDS]
            if not kinds:
                return None
            kind = self._rng.choice(kinds)
            fault = make_fault(kind, self._rng, stall_seconds=self.stall_seconds)
            self._injected[kind] += 1
            return fault

    def injected(self):
        with self._rng_lock:
            return Counter(self._injected)


class OverlapServer(ShardServer):
    """A ShardServer that also measures how many GET bodies of one file are being sent at the same time
    (`max_overlap()`: the most, over all files): 1 means no shard was ever downloaded twice at once."""

    def __init__(self, directory, **kw):
        super().__init__(directory, **kw)
        self._live = Counter()
        self._most = Counter()

    def _count_body(self, name, start, n):
        ticket = super()._count_body(name, start, n)
        with self._lock:
            self._live[name] += 1
            self._most[name] = max(self._most[name], self._live[name])
        return name, ticket

    def _recount_body(self, ticket, sent):
        name, inner = ticket
        with self._lock:
            self._live[name] -= 1
        super()._recount_body(inner, sent)

    def max_overlap(self):
        with self._lock:
            return max(self._most.values(), default=0)


def faults_struck(srv):
    """Requests a fault struck, over every file the server counted (scripted and random)."""
    return sum(s.faults for s in srv.all_stats().values())


def shard_files(d):
    """{shard id: path} of final-named shard files in d."""
    out = {}
    if not os.path.isdir(d):
        return out
    for e in os.scandir(d):
        if e.name.startswith("shard_") and e.name.endswith(".parquet"):
            out[int(e.name[6:-8])] = e.path
    return out


def partial_files(d):
    if not os.path.isdir(d):
        return []
    return sorted(e.name for e in os.scandir(d) if e.name.endswith(".partial"))


def shard_bytes_on_disk(d):
    """Bytes of shard files and partial files in d (what a budget must bound); 0 before d exists.

    Counted straight from the directory, independently of the cache's own books, which it checks."""
    if not os.path.isdir(d):
        return 0
    total = 0
    for e in os.scandir(d):
        if e.name.startswith("shard_") and (e.name.endswith(".parquet") or e.name.endswith(".partial")):
            try:
                total += e.stat().st_size
            except FileNotFoundError:
                pass
    return total


def check_final_files(d, shas):
    """Every final-named shard file in d is byte-identical to the source. Returns bytes checked."""
    n = 0
    for i, path in shard_files(d).items():
        got = sha256_of(path)
        assert got == shas[i], f"{path} under its final name is not the source's file (sha256 {got[:12]}...)"
        n += os.path.getsize(path)
    return n


def until(cond, timeout=20.0, what="condition", every=0.01):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def tally(case, *, faults=0, bytes_verified=0, lost=0, shards_read=0):
    """Record one proven case (see the module docstring). A no-op unless REL_TALLY is set."""
    path = os.environ.get("REL_TALLY")
    if not path:
        return
    line = json.dumps({"case": case, "faults": int(faults), "bytes_verified": int(bytes_verified),
                       "shards_read": int(shards_read), "lost": int(lost)})
    with open(path, "a") as f:
        f.write(line + "\n")


class TinyServer:
    """A throwaway HTTP server on 127.0.0.1 for branches the ShardServer never takes (a server that ignores
    Range, redirects, hostile headers, an endless body). `with TinyServer(Handler) as srv:` -> srv.url."""

    def __init__(self, handler):
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


class EndlessHandler(http.server.BaseHTTPRequestHandler):
    """A body with no length that never ends (6.5 GB if nobody stops reading): the size cap must cut it."""
    protocol_version = "HTTP/1.0"          # no length: the body ends when the connection does

    def log_message(self, *a):
        pass

    def do_HEAD(self):
        self.send_response(200)
        self.send_header("ETag", '"x"')
        self.end_headers()

    def do_GET(self):
        self.do_HEAD()
        try:
            for _ in range(100_000):
                self.wfile.write(b"x" * 65536)
        except OSError:
            pass


class HostileFile:
    """One file a HostileServer serves, and how it misbehaves. Tests change the attributes between and
    during requests (the server reads them per request, under no lock: tests set them before they matter).

    body                 the bytes served now (swap it to replace the file on the server)
    etag, last_modified  validators sent with every answer (None: not sent)
    honor_if_range       answer a Range whose If-Range does not match with 200 and the whole body (RFC 9110);
                         False: serve the range regardless (a server that ignores If-Range)
    drop_after           on the next GET, send this many body bytes, then hang up (one shot)
    after_drop           called once right after that drop (e.g. to replace the file)
    range_shift          serve a 206 whose bytes start this many bytes off from what was asked, with an
                         honest Content-Range for the asked range (a lying server)
    trickle              send the body at this many bytes per second (None: at once)
    hold_after           send this many body bytes, then keep the connection open sending nothing, until
                         `release` is set
    """

    def __init__(self, body, etag=None, last_modified=None):
        self.body, self.etag, self.last_modified = body, etag, last_modified
        self.honor_if_range = True
        self.drop_after = None
        self.after_drop = None
        self.range_shift = 0
        self.trickle = None
        self.hold_after = None
        self.release = threading.Event()
        self.gets = []                  # the request headers of every GET, in order


class HostileServer(TinyServer):
    """A TinyServer serving {name: HostileFile} at /<name> (anything else: 404). For the branches of a resume
    the ShardServer never takes: files replaced between tries, validators, lying ranges, trickles."""

    def __init__(self, files):
        self.files = files
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _file(self):
                return outer.files.get(self.path.lstrip("/").split("?")[0])

            def _validators(self, f):
                if f.etag is not None:
                    self.send_header("ETag", f.etag)
                if f.last_modified is not None:
                    self.send_header("Last-Modified", f.last_modified)

            def do_HEAD(self):
                f = self._file()
                if f is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(f.body)))
                self._validators(f)
                self.end_headers()

            def do_GET(self):
                f = self._file()
                if f is None:
                    self.send_error(404)
                    return
                f.gets.append(dict(self.headers))
                body, start = f.body, 0
                rng, if_range = self.headers.get("Range"), self.headers.get("If-Range")
                if rng and not (f.honor_if_range and if_range is not None
                                and if_range not in (f.etag, f.last_modified)):
                    start = int(rng.split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                    data = body[start + f.range_shift:] + body[:f.range_shift]
                else:
                    self.send_response(200)
                    data = body
                self.send_header("Content-Length", str(len(data)))
                self._validators(f)
                self.end_headers()
                try:
                    self._send(f, data)
                except OSError:
                    pass

            def _send(self, f, data):
                if f.drop_after is not None:
                    n, f.drop_after = f.drop_after, None
                    self.wfile.write(data[:n])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    if f.after_drop is not None:
                        f.after_drop()
                        f.after_drop = None
                    return
                if f.hold_after is not None:
                    self.wfile.write(data[:f.hold_after])
                    self.wfile.flush()
                    f.release.wait(30)
                    self.close_connection = True
                    return
                if f.trickle is None:
                    self.wfile.write(data)
                    return
                step = max(1, int(f.trickle // 10))
                for i in range(0, len(data), step):
                    if f.release.is_set():
                        break
                    self.wfile.write(data[i:i + step])
                    self.wfile.flush()
                    time.sleep(0.1)
                self.close_connection = True

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __exit__(self, *exc):
        for f in self.files.values():
            f.release.set()
        super().__exit__(*exc)


HUB_ENV = ("HF_TOKEN", "HF_HUB_OFFLINE", "HF_TOKEN_PATH", "HF_ENDPOINT")
FILE_PICKS = ("SHARDSTREAM_SOURCE", "SHARDSTREAM_FILES", "SHARDSTREAM_VAL_FILES", "SHARDSTREAM_MANIFEST",
              "SHARDSTREAM_DATA_DIR")


def isolate_hub_env(monkeypatch, tmp_path, also=()):
    """No Hub token, endpoint or offline flag from the shell (nor the names in `also`), and HF_HOME in
    tmp_path: no token saved by `hf auth login` unless the test writes one."""
    for name in HUB_ENV + tuple(also):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))

