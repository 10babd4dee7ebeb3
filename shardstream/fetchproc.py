"""fetch_shard in a helper process, so that its per-byte work stays out of the training process.

A download's reads, writes, sha256 and part threads all take the interpreter lock between system calls;
in the trainer's process they take it from the training thread, hundreds of times a second per
transfer. FetchHelper runs each fetch_shard call in one long-lived child process (a `python -c` that runs
_child) instead and forwards what the caller would have seen: on_bytes / on_retry /
on_link as they happen, the FetchResult or the exception (the same types), the child's log records.
The caller's thread blocks in FetchHelper.fetch exactly as it would in fetch_shard, so the downloader's
scheduling, budget and failure handling do not change. Files, locks and sidecars are the same on disk:
the child takes the shard's lock, a kill -9 of either process leaves a partial that the next fetch
resumes. The one process-wide setting a fetch reads, the row-group caps (verify.row_group_limits), goes
with each fetch.

The child runs at NICE below its parent's CPU priority: where the trainer and the downloads both want a
core, the trainer gets it (downloads run ahead of the reader; a link is not CPU-bound). It checks PROTOCOL
first: a child started from newer code on disk than its parent's refuses to serve, and the parent fetches
itself.

Which fetches go there is use_helper's decision (FetchPolicy.process: "auto" sends shards of at least
min_process_bytes once the child is up, True always, False never); run_fetch is the one call site.

The protocol (one socketpair, length-prefixed pickles; both ends are ours):
    parent -> child: ("source", sid, Source), ("fetch", jid, sid, shard_id, data_dir, policy, info, limits),
                     ("cancel", jid), ("quit",)
    child -> parent: ("ready", pid), ("bytes", jid, n), ("retry", jid, cause), ("link", jid, busy),
                     ("done", jid, FetchResult), ("failed", jid, exception), ("log", record dict)
"""
import itertools
import logging
import os
import pickle
import queue
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

from .errors import FetchCancelled, ShardStreamError, TransientFetchError
from .fetch import fetch_shard
from .verify import configure_row_group_limits, row_group_limits

logger = logging.getLogger(__name__)

PROTOCOL = 1            # the messages below; a child of another version refuses to serve
NICE = 5                # the helper's CPU priority below the trainer's: where both want a core, training
                        # gets it first (the window ahead absorbs a slower download; links are not CPU-bound)
MAX_STARTS = 3          # a helper that keeps dying is given up on: fetches then run in the caller's thread
READY_TIMEOUT = 60.0    # seconds a forced helper (process=True) may take to start
POLL = 0.2              # how often a waiting caller looks at its stop event


def use_helper(policy, size):
    """Does a fetch of a shard of `size` bytes (None: unknown) belong in the helper process?"""
    if policy.process == "auto":
        return size is not None and size >= policy.min_process_bytes
    return bool(policy.process)


def run_fetch(helper, source, shard_id, data_dir, policy, *, session=None, stop=None, on_bytes=None, info=None,
              on_retry=None, on_link=None, size=None):
    """fetch_shard's call, in helper's process when use_helper says so and the helper is up (a forced one
    is waited for), else in this thread. helper None: always here. size: the shard's, when info does not
    carry it."""
    if size is None and info is not None:
        size = info.size
    if helper is not None and use_helper(policy, size):
        if helper.available(wait=policy.process is True):
            return helper.fetch(source, shard_id, data_dir, policy, stop=stop, on_bytes=on_bytes, info=info,
                                on_retry=on_retry, on_link=on_link)
    return fetch_shard(source, shard_id, data_dir, policy, session=session, stop=stop, on_bytes=on_bytes,
                       info=info, on_retry=on_retry, on_link=on_link)


# -----------------------------------------------------------------------------
# the wire

class _Channel:
    """Whole messages over a stream socket: a 4-byte length, then a pickle."""

    def __init__(self, sock):
        self.sock = sock
        self.lock = threading.Lock()

    def send(self, msg):
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        with self.lock:
            self.sock.sendall(struct.pack("!I", len(data)) + data)

    def recv(self):
        """The next message; EOFError when the other end is gone."""
        (n,) = struct.unpack("!I", self._exactly(4))
        return pickle.loads(self._exactly(n))

    def _exactly(self, n):
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            k = self.sock.recv_into(view[got:])
            if not k:
                raise EOFError("the other end closed the connection")
            got += k
        return buf


# -----------------------------------------------------------------------------
# the parent's side

class FetchHelper:
    """One helper process, started on first need (available()), shared by every thread of a downloader;
    close() ends it. Thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._proc = None
        self._chan = None
        self._reader = None
        self._jobs = {}             # jid -> the caller's queue of messages
        self._sources = {}          # id(source) -> source, sent to the current child already
        self._ids = itertools.count()
        self._starts = 0
        self._closed = False
        self.served = 0             # fetches the helper finished (done or failed), for status and tests

    @property
    def pid(self):
        p = self._proc
        return p.pid if p is not None and self._ready.is_set() else None

    def available(self, wait=False):
        """Is the helper up to take a fetch? Starts it when it is not running (and has not died
        MAX_STARTS times); wait: block until it is up (or cannot be)."""
        with self._lock:
            if self._closed:
                return False
            if self._proc is None and self._starts < MAX_STARTS:
                self._start()
            proc = self._proc
        if proc is None:
            return False
        deadline = time.monotonic() + READY_TIMEOUT
        while wait and not self._ready.is_set() and self._proc is proc and time.monotonic() < deadline:
            self._ready.wait(0.05)          # (ends early when the child dies before it is up)
        return self._ready.is_set() and self._proc is proc

    def _start(self):
        """Spawn the child (lock held); it says "ready" once its imports are done."""
        self._starts += 1
        mine, theirs = socket.socketpair()
        root = str(Path(__file__).resolve().parent.parent)      # this very package, wherever it was found
        level = logging.getLogger("shardstream").getEffectiveLevel()
        boot = (f"import sys; sys.path.insert(0, {root!r}); from shardstream.fetchproc import _child; "
                f"_child({theirs.fileno()}, {level}, {PROTOCOL}, {NICE})")
        try:
            proc = subprocess.Popen([sys.executable, "-c", boot], pass_fds=(theirs.fileno(),),
                                    stdin=subprocess.DEVNULL)
        except OSError as e:
            mine.close()
            logger.warning("could not start the download helper process (%s); downloads run in this process", e)
            self._starts = MAX_STARTS
            return
        finally:
            theirs.close()
        self._proc, self._chan, self._sources = proc, _Channel(mine), {}
        self._reader = threading.Thread(target=self._read_loop, args=(proc, self._chan),
                                        name="shardstream-fetchproc", daemon=True)
        self._reader.start()

    def _read_loop(self, proc, chan):
        try:
            while True:
                msg = chan.recv()
                kind = msg[0]
                if kind == "ready":
                    logger.info("download helper process %d is up: big shards are fetched there, out of this "
                                "process's interpreter lock", msg[1])
                    self._ready.set()
                elif kind == "log":
                    record = logging.makeLogRecord(msg[1])
                    target = logging.getLogger(record.name)
                    if target.isEnabledFor(record.levelno):
                        target.handle(record)
                else:
                    with self._lock:
                        q = self._jobs.get(msg[1])
                    if q is not None:
                        q.put(msg)
        except (EOFError, OSError, pickle.UnpicklingError):
            pass
        code = proc.wait()
        with self._lock:
            gone = self._proc is proc
            if gone:
                self._proc, self._chan = None, None
                self._ready.clear()
            jobs = list(self._jobs.values())
            closed = self._closed
        chan.sock.close()
        if gone and not closed:
            logger.warning("the download helper process (pid %d) exited with code %s; %s", proc.pid, code,
                           "it is started again for the next download" if self._starts < MAX_STARTS else
                           "downloads run in this process from now on")
        for q in jobs:
            q.put(("lost", None, proc.pid, code))

    def fetch(self, source, shard_id, data_dir, policy, *, stop=None, on_bytes=None, info=None, on_retry=None,
              on_link=None):
        """fetch_shard(...) in the helper: the same result, callbacks (called in this thread) and errors.
        stop cancels as fetch_shard's does. The helper dying mid-fetch is a TransientFetchError (the
        partial is kept; a retry resumes it)."""
        q = queue.SimpleQueue()
        with self._lock:
            chan = self._chan
            if chan is None:
                raise TransientFetchError(f"shard {shard_id:05d}: the download helper process is not running; "
                                          f"retrying", shard_id=shard_id, cause="helper process not running")
            jid = next(self._ids)
            self._jobs[jid] = q
            sid = id(source)
            try:
                if self._sources.get(sid) is not source:
                    self._sources[sid] = source             # held, so that its id is not reused
                    chan.send(("source", sid, source))
                chan.send(("fetch", jid, sid, shard_id, str(data_dir), policy, info, row_group_limits()))
            except OSError:
                q.put(("lost", jid, self._proc.pid if self._proc else 0, None))
        linked, cancelled = False, False
        try:
            while True:
                try:
                    msg = q.get(timeout=POLL)
                except queue.Empty:
                    if stop is not None and stop.is_set() and not cancelled:
                        cancelled = True
                        try:
                            chan.send(("cancel", jid))
                        except OSError:
                            pass
                    continue
                kind = msg[0]
                if kind == "bytes":
                    if on_bytes is not None:
                        on_bytes(msg[2])
                elif kind == "link":
                    linked = msg[2]
                    if on_link is not None:
                        on_link(msg[2])
                elif kind == "retry":
                    if on_retry is not None:
                        on_retry(msg[2])
                elif kind == "done":
                    self._count()
                    return msg[2]
                elif kind == "failed":
                    self._count()
                    raise msg[2]
                elif kind == "lost":
                    if linked and on_link is not None:
                        on_link(False)
                    if cancelled:
                        raise FetchCancelled(f"shard {shard_id:05d}: cancelled (the download helper process "
                                             f"exited)", shard_id=shard_id)
                    raise TransientFetchError(
                        f"shard {shard_id:05d}: the download helper process (pid {msg[2]}) exited with code "
                        f"{msg[3]} during the fetch; the partial file is kept and the fetch is retried",
                        shard_id=shard_id, cause=f"helper process exited with code {msg[3]}")
        finally:
            with self._lock:
                self._jobs.pop(jid, None)

    def _count(self):
        with self._lock:
            self.served += 1

    def close(self, timeout=10.0):
        """End the helper: running fetches are cancelled (their partials kept); idempotent."""
        with self._lock:
            self._closed = True
            proc, chan, reader = self._proc, self._chan, self._reader
        if proc is None:
            return
        try:
            chan.send(("quit",))
        except OSError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if reader is not None:
            reader.join(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# -----------------------------------------------------------------------------
# the child's side

class _Forward(logging.Handler):
    """The child's log records, sent whole to the parent, which hands them to its own loggers."""

    def __init__(self, chan):
        super().__init__()
        self.chan = chan

    def emit(self, record):
        try:
            d = dict(record.__dict__)
            d["msg"], d["args"] = record.getMessage(), None
            if record.exc_info:
                d["exc_text"] = self.formatter.formatException(record.exc_info) if self.formatter else \
                    "".join(traceback.format_exception(*record.exc_info))
            d["exc_info"] = None
            self.chan.send(("log", d))
        except Exception:       # a log line must never break a download
            pass


def _sendable(e):
    """An exception the parent can unpickle: ours and OSErrors as they are, anything else (a bug) as a
    RuntimeError that carries its traceback."""
    if isinstance(e, (ShardStreamError, OSError)):
        try:
            pickle.loads(pickle.dumps(e))
            return e
        except Exception:
            pass
    tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    return RuntimeError(f"the download helper process failed: {type(e).__name__}: {e}\n{tb}")


def _child(fd, level, protocol, nice=0):
    if protocol != PROTOCOL:    # shardstream was upgraded under a running parent: its fetches stay there
        sys.exit(f"shardstream.fetchproc: this helper speaks protocol {PROTOCOL}, its parent {protocol} "
                 f"(shardstream changed on disk since the parent started); the parent fetches in its own process")
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # Ctrl-C is the parent's: it cancels through "cancel"
    if nice:
        try:
            os.nice(nice)
        except OSError:
            pass
    import requests
    chan = _Channel(socket.socket(fileno=fd))
    root = logging.getLogger("shardstream")
    root.setLevel(level)
    root.addHandler(_Forward(chan))
    root.propagate = False
    sources, stops, threads = {}, {}, []
    sessions, sessions_lock = [], threading.Lock()

    def job(jid, source, shard_id, data_dir, policy, info, stop):
        with sessions_lock:
            session = sessions.pop() if sessions else requests.Session()
        try:
            res = fetch_shard(source, shard_id, data_dir, policy, session=session, stop=stop, info=info,
                              on_bytes=lambda n: chan.send(("bytes", jid, n)),
                              on_retry=lambda cause: chan.send(("retry", jid, cause)),
                              on_link=lambda busy: chan.send(("link", jid, busy)))
            msg = ("done", jid, res)
        except BaseException as e:
            msg = ("failed", jid, _sendable(e))
        finally:
            with sessions_lock:
                sessions.append(session)
            stops.pop(jid, None)
        try:
            chan.send(msg)
        except OSError:
            pass

    chan.send(("ready", os.getpid()))
    try:
        while True:
            msg = chan.recv()
            kind = msg[0]
            if kind == "source":
                sources[msg[1]] = msg[2]
            elif kind == "fetch":
                jid, sid, shard_id, data_dir, policy, info, limits = msg[1:]
                configure_row_group_limits(limits.max_bytes, limits.max_rows)   # the parent's caps, as set now
                stops[jid] = stop = threading.Event()
                t = threading.Thread(target=job, args=(jid, sources[sid], shard_id, data_dir, policy, info, stop),
                                     name=f"fetch-{shard_id:05d}", daemon=True)
                t.start()
                threads = [x for x in threads if x.is_alive()] + [t]
            elif kind == "cancel":
                s = stops.get(msg[1])
                if s is not None:
                    s.set()
            elif kind == "quit":
                break
    except (EOFError, OSError):
        pass                    # the parent is gone: stop what runs (partials kept) and exit
    for s in list(stops.values()):
        s.set()
    for t in threads:
        t.join(timeout=5)
    for s in sessions:
        s.close()

