"""One downloader per node under torchrun: the node leader, the node's readers, and the factory every rank calls.

    dl = make_node_downloader(total_shards=100, buffer_size=5, max_cache_bytes=20e9)   # every rank
    with dl:
        loader = tokenizing_distributed_data_loader_with_state_bos_bestfit(..., streaming_downloader=dl)

- On the node leader (local rank 0) it returns a `NodeLeader`: the node's one StreamingDownloader, plus
  one long-lived handler per other local rank (`Follower`) serving that rank's requests from the store in
  the order it made them, by calling `wait_for_shard(i, reader=local_rank)` / `release(i,
  reader=local_rank)` on its behalf. The first local rank to ask for a train shard also leases it for
  every local rank still behind it ("pre-lease"), so a shard is deleted only after every local rank
  released it, however far a slow rank lags (within the budget).
- On every other local rank it returns a `NodeReader`, which publishes requests and waits for the
  leader's answers. It never touches the network or the cache itself.
- Outside torchrun (one process) it returns a plain StreamingDownloader.
All three are `reader.ShardReader`s: the loader cannot tell them apart.

Messages travel through the job's store (torchrun.py: our own TCPStore client, non-blocking operations,
polling), never through NCCL/gloo collectives. Keys under `<group>/`: `leader` (starting, ready with the
data dir/plan/source, error, stopped), `beat/<r>` (heartbeats), `r<r>/q<seq>` and `r<r>/a<seq>` (a request
and its answer), `requests` (one counter the leader polls), `status` (the leader's DownloaderStatus).

Liveness: the leader and every reader bump a heartbeat counter each second. A reader whose leader stops
beating for `timeout` seconds raises RankLost; a downloader error on the leader (a failed shard, a crash,
the disk floor) is sent back and raised in the reader as the same exception class; a leader that stops
tells its readers (DownloaderStopped).

`partition="node"`: node n reads only shards n, n+N, ... (N nodes), row groups strided over its local
ranks (the loader reads the downloader's `plan` and `row_group_stride`). `scope="cluster"`: one
downloader for the whole job (global rank 0) for a cache dir shared by every node (NFS).
"""
import logging
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from . import errors
from .errors import ConfigError, DownloaderStopped, RankLost, ShardStreamError
from .shards import shard_name
from .torchrun import BEAT_EVERY, DEFAULT_TIMEOUT, POLL_MAX, POLL_MIN, Heartbeat, Watch, node_info, open_store

logger = logging.getLogger(__name__)
P = "[shardstream.distributed]"

PARTITIONS = ("global", "node")     # global: nanochat's (every node reads every shard); node: 1/N per node
SCOPES = ("node", "cluster")        # one downloader per node, or one for the job (shared cache dir)


def node_shards(total_shards, node_rank, num_nodes):
    """partition="node": the train shards node `node_rank` of `num_nodes` reads, in order."""
    shards = list(range(node_rank, total_shards, num_nodes))
    if not shards:
        raise ConfigError(f"node {node_rank} of {num_nodes} gets none of the {total_shards} train shards with "
                          f"partition='node': stream at least {num_nodes} shards, or use partition='global'")
    return shards


def error_payload(e):
    """An exception as a JSON answer (raise_payload raises it again on the other side)."""
    return {"ok": False, "type": type(e).__name__, "message": str(e), "shard": getattr(e, "shard_id", None)}


def raise_payload(resp, who):
    """Raise the exception the leader sent, as the same shardstream class when there is one."""
    cls = getattr(errors, resp.get("type", ""), None)
    if not (isinstance(cls, type) and issubclass(cls, ShardStreamError)):
        cls = ShardStreamError
    msg = f"{resp.get('message')} (raised on {who}, {resp.get('type')})"
    shard = resp.get("shard")
    if issubclass(cls, (errors.FetchError, errors.ShardSkipped)):
        raise cls(msg, shard_id=shard)
    raise cls(msg)


# -----------------------------------------------------------------------------------------------------
# The group of processes sharing one downloader

@dataclass(frozen=True)
class Group:
    """Who shares a downloader: `members` (reader ids), `me` (my reader id), `key` (store namespace)."""
    key: str
    leader_rank: int
    me: int
    members: tuple

    @property
    def is_leader(self):
        return self.me == 0

    @classmethod
    def of(cls, info, scope):
        if scope not in SCOPES:
            raise ConfigError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
        if scope == "cluster":
            return cls("cluster", 0, info.rank, tuple(range(info.world_size)))
        return cls(f"node{info.node_rank}", info.rank - info.local_rank, info.local_rank,
                   tuple(range(info.local_world_size)))


# -----------------------------------------------------------------------------------------------------
# The leader

class NodeLeader:
    """The group's one StreamingDownloader, serving the other members' requests from the store.

    As a ShardReader it is reader 0 (the leader process's own loader). `row_group_stride`: the (local
    rank, local world) of partition="node", None otherwise."""

    def __init__(self, downloader, group, store, timeout, row_group_stride=None):
        self.downloader = downloader
        self.group = group
        self.store = store
        self.timeout = timeout
        self._stride = None if row_group_stride is None else tuple(row_group_stride)
        self._index = {s: k for k, s in enumerate(downloader.plan.order)}
        self._lock = threading.Lock()   # guards _pos and _pre
        self._pos = {}                  # reader -> position of the train shard it asked for last
        self._pre = {}                  # reader -> {position: shard} leased for it before it asked
        self._stop = threading.Event()
        self._beat = Heartbeat(store, f"{group.key}/beat/0", extra=self._publish_status)
        self._followers = {m: Follower(self, m) for m in group.members if m != 0}
        self._thread = None
        self._started = False

    def __repr__(self):
        return f"NodeLeader(group={self.group.key!r}, readers={list(self.group.members)}, {self.downloader!r})"

    # --- the reader interface (reader 0)
    source = property(lambda self: self.downloader.source)
    data_dir = property(lambda self: self.downloader.data_dir)
    val_shard = property(lambda self: self.downloader.val_shard)
    val_shards = property(lambda self: self.downloader.val_shards)
    text_column = property(lambda self: self.downloader.text_column)
    total_shards = property(lambda self: self.downloader.total_shards)
    buffer_size = property(lambda self: self.downloader.buffer_size)
    plan = property(lambda self: self.downloader.plan)

    def row_group_stride(self, split):
        return self._stride if split == "train" else None

    def get_status(self):
        return self.downloader.get_status()

    def wait_for_shard(self, shard_id, timeout=None, *, reader=0):
        """Lease shard_id to `reader`. The first member to ask for a train shard also leases it for every
        member still behind it (a "pre-lease"), so it is deleted only once all of them released it."""
        dl = self.downloader
        if shard_id not in self._index or len(self.group.members) == 1:
            return dl.wait_for_shard(shard_id, timeout, reader=reader)
        with self._lock:
            pos = self._advance(reader, shard_id)
            mine = self._pre.setdefault(reader, {})
            claimed = mine.pop(pos, None) == shard_id
            stale = [(p, s) for p, s in mine.items() if p < pos]     # skipped (a resume further on)
            for p, _ in stale:
                del mine[p]
        for _, s in stale:
            dl.release(s, reader=reader)
        path = dl.wait_for_shard(shard_id, timeout, reader=reader)
        if claimed:                 # it already held the pre-lease: keep one lease, not two
            dl.release(shard_id, reader=reader)
            return path
        for other in self.group.members:
            if other == reader:
                continue
            with self._lock:
                last = self._pos.get(other)
                theirs = self._pre.setdefault(other, {})
                if (last is not None and last >= pos) or pos in theirs:
                    continue        # it has read this one already (or holds it)
                theirs[pos] = shard_id
            dl.wait_for_shard(shard_id, reader=other)   # on disk and leased by `reader`: returns at once
        return path

    def _advance(self, reader, shard_id):
        """The reader's position in its stream of train shards (epochs counted by wrap-arounds)."""
        k = self._index[shard_id]
        last = self._pos.get(reader)
        if last is None:
            pos = k
        else:
            epoch, idx = divmod(last, len(self._index))
            pos = (epoch + (k < idx)) * len(self._index) + k
        self._pos[reader] = pos
        return pos

    def release(self, shard_id, *, reader=0, consumed=True):
        self.downloader.release(shard_id, reader=reader, consumed=consumed)

    # --- start / stop
    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
        return False

    def start(self):
        if self._started:
            return self
        self._started = True
        g = self.group.key
        self.store.set(f"{g}/leader", {"state": "starting", "pid": os.getpid(), "host": socket.gethostname()})
        self._beat.start()
        try:
            self.downloader.start()
        except BaseException as e:
            self.store.set(f"{g}/leader", {"state": "error", **error_payload(e)})
            self._beat.stop()
            raise
        dl = self.downloader
        self.store.set(f"{g}/leader", {
            "state": "ready", "pid": os.getpid(), "host": socket.gethostname(),
            "data_dir": str(dl.data_dir), "source": dl.source.identity(),
            "plan": list(dl.plan.order), "epochs": dl.plan.epochs,
            "total_shards": dl.total_shards, "buffer_size": dl.buffer_size, "text_column": dl.text_column,
            "stride": None if self._stride is None else list(self._stride)})
        self._publish_status()
        if self._followers:
            for f in self._followers.values():
                f.start()
            self._thread = threading.Thread(target=self._dispatch, name="shardstream-node-leader", daemon=True)
            self._thread.start()
        logger.info(f"{P} node leader ready: one downloader for readers {list(self.group.members)} "
                    f"({self.group.key}), data dir {dl.data_dir}")
        return self

    def stop(self):
        if self._stop.is_set():
            return
        self._stop.set()
        try:
            self.store.set(f"{self.group.key}/leader", {"state": "stopped", "pid": os.getpid()})
        except Exception as e:
            logger.debug(f"{P} could not tell the readers the leader stopped: {e}")
        self._beat.stop()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for f in self._followers.values():
            f.close()
        self.downloader.stop()          # ends the handlers' waits (DownloaderStopped, sent back)
        # joined: a daemon thread still inside a store call at interpreter exit aborts the process
        for f in self._followers.values():
            f.join(timeout=5)

    # --- serving the followers
    def _publish_status(self):
        try:
            self.store.set(f"{self.group.key}/status", self.downloader.get_status().to_dict())
        except Exception as e:
            logger.debug(f"{P} could not publish the status: {e}")

    def _dispatch(self):
        """Hand every follower's requests, in the order it made them, to its handler (one store counter
        polled: the traffic does not grow with the number of followers while they are idle)."""
        g = self.group.key
        nxt = {m: 0 for m in self._followers}
        seen = None
        poll = POLL_MIN
        while not self._stop.is_set():
            try:
                n = self.store.add(f"{g}/requests", 0)
                if n == seen:
                    time.sleep(poll)
                    poll = min(POLL_MAX, poll * 2)
                    continue
                seen, poll = n, POLL_MIN
                for m, follower in self._followers.items():
                    while True:
                        req = self.store.pop(f"{g}/r{m}/q{nxt[m]}")
                        if req is None:
                            break
                        follower.put(nxt[m], req)
                        nxt[m] += 1
            except Exception as e:
                if self._stop.is_set():
                    return
                logger.error(f"{P} the node leader's coordinator lost the store ({e}); readers will stop")
                return


class Follower:
    """The leader's handler for one follower: serves its requests in the order it made them.

    Requests for the read plan's shards are served by one long-lived thread, strictly in order (the
    leader's positions and pre-leases follow the order the follower asked in, and a release never
    overtakes the wait before it). Requests for other shards (the val shard an evaluation reads) get a
    second thread, so an evaluation never queues behind a wait for the next train shard, which may itself
    be waiting for room that only the other ranks' training, after their evaluation, frees."""

    LANES = ("plan", "other")

    def __init__(self, leader, member):
        self.leader = leader
        self.member = member
        self.queues = {lane: queue.SimpleQueue() for lane in self.LANES}
        self.threads = [threading.Thread(target=self._run, args=(self.queues[lane],), daemon=True,
                                         name=f"shardstream-serve-r{member}-{lane}") for lane in self.LANES]

    def start(self):
        for t in self.threads:
            t.start()

    def put(self, seq, req):
        shard = req.get("shard")
        lane = "plan" if isinstance(shard, int) and shard in self.leader.plan else "other"
        self.queues[lane].put((seq, req))

    def close(self):
        """Serve what is queued, then end (the leader's downloader.stop() ends a wait in progress)."""
        for q in self.queues.values():
            q.put(None)

    def join(self, timeout):
        deadline = time.monotonic() + timeout
        for t in self.threads:
            if t.is_alive():
                t.join(max(0.0, deadline - time.monotonic()))

    def _run(self, q):
        while True:
            item = q.get()
            if item is None:
                return
            seq, req = item
            resp = self.serve(req)
            try:
                self.leader.store.set(f"{self.leader.group.key}/r{self.member}/a{seq}", resp)
            except Exception as e:
                logger.debug(f"{P} could not answer reader {self.member}: {e}")

    def serve(self, req):
        """One request, answered as a JSON dict (errors too)."""
        op, shard, me = req.get("op"), req.get("shard"), self.member
        try:
            if op == "wait":
                return {"ok": True, "path": str(self.leader.wait_for_shard(shard, req.get("timeout"), reader=me))}
            if op == "release":
                self.leader.release(shard, reader=me, consumed=req.get("consumed", True) is not False)
                return {"ok": True}
            raise ConfigError(f"unknown request {op!r} from reader {me}")
        except Exception as e:
            logger.debug(f"{P} request {op} {shard} from reader {me} failed: {type(e).__name__}: {e}")
            return error_payload(e)


# -----------------------------------------------------------------------------------------------------
# A reader of the leader's downloader

class NodeReader:
    """A local rank's view of the node leader's downloader: the reader interface over the store. One
    reader id (this rank's place in the group): `reader=` is ignored."""

    def __init__(self, group, store, source, timeout):
        self.group = group
        self.store = store
        self._source = source
        self.timeout = timeout
        self._lock = threading.Condition()      # guards _seq, _calls, _stopped
        self._seq = 0
        self._calls = 0                         # requests waiting for their answer
        self._info = None
        self._beat = Heartbeat(store, f"{group.key}/beat/{group.me}")
        self._leader = Watch(store, f"{group.key}/beat/0", timeout)
        self._stopped = False

    def __repr__(self):
        return f"NodeReader(reader={self.group.me}, group={self.group.key!r})"

    # --- what the loader reads
    @property
    def source(self):
        return self._source

    @property
    def data_dir(self):
        return Path(self._ready()["data_dir"])

    @property
    def val_shard(self):
        return self._source.val_shard

    @property
    def val_shards(self):
        return tuple(self._source.val_shards)

    @property
    def text_column(self):
        """The leader's (every rank reads the column its downloader verified)."""
        return self._ready().get("text_column", "text")

    @property
    def total_shards(self):
        return self._ready()["total_shards"]

    @property
    def buffer_size(self):
        return self._ready()["buffer_size"]

    @property
    def plan(self):
        from .cache import ReadPlan
        info = self._ready()
        return ReadPlan(tuple(info["plan"]), info.get("epochs", 1))

    def row_group_stride(self, split):
        # The leader publishes its own (local_rank, local_world); each reader strides from its own rank.
        stride = self._ready().get("stride")
        return (self.group.me, stride[1]) if (stride is not None and split == "train") else None

    def get_status(self):
        from .status import DownloaderStatus
        d = self.store.get(f"{self.group.key}/status")
        if d is None:
            raise DownloaderStopped(f"{self.group.key}: the node leader has published no status yet")
        return DownloaderStatus.from_dict(d)

    # --- start / stop
    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
        return False

    def start(self):
        if self._info is None:
            self._beat.start()
            self._info = self._wait_leader_ready()
        return self

    def stop(self):
        """Stop: a request still waiting for its answer raises DownloaderStopped, and stop() returns once
        none is inside a store call (a daemon thread in one at interpreter exit aborts the process)."""
        with self._lock:
            self._stopped = True
            deadline = time.monotonic() + POLL_MAX + 5
            while self._calls and time.monotonic() < deadline:
                self._lock.wait(deadline - time.monotonic())
        self._beat.stop()

    def _ready(self):
        if self._info is None:
            raise DownloaderStopped(f"{self!r}: call start() (or use `with`) first")
        return self._info

    def _leader_state(self):
        return self.store.get(f"{self.group.key}/leader")

    def _check_leader(self, what):
        """Raise if the leader stopped, failed or went silent."""
        st = self._leader_state()
        if st is not None and st.get("state") == "stopped":
            raise DownloaderStopped(f"{what}: the node leader ({self.group.key}, pid {st.get('pid')}) stopped "
                                    f"its downloader")
        if st is not None and st.get("state") == "error":
            raise_payload(st, f"the node leader of {self.group.key} while starting")
        if self._leader.lost():
            raise RankLost(f"{what}: the node leader (rank {self.group.leader_rank}, {self.group.key}) has been "
                           f"silent for {self._leader.silent_for():.0f} s: it died or hangs (timeout "
                           f"{self.timeout:g} s, SHARDSTREAM_DIST_TIMEOUT)")

    def _wait_leader_ready(self):
        t0 = time.monotonic()
        poll = POLL_MIN
        while True:
            st = self._leader_state()
            if st is not None and st.get("state") == "ready":
                break
            self._check_leader(f"reader {self.group.me} waiting for the node leader to start")
            time.sleep(poll)
            poll = min(POLL_MAX, poll * 2)
        mine, theirs = self._source.identity(), st["source"]
        if mine != theirs:
            raise ConfigError(f"rank with reader id {self.group.me} was given source {mine} but the node leader "
                              f"streams {theirs}: give every rank the same source and dataset")
        logger.info(f"{P} reader {self.group.me} attached to the node leader of {self.group.key} "
                    f"(after {time.monotonic() - t0:.1f} s)")
        return st

    # --- requests
    def _call(self, op, shard_id, timeout=None, **extra):
        self._ready()
        g, me = self.group.key, self.group.me
        with self._lock:
            if self._stopped:
                raise DownloaderStopped(f"{self!r} was stopped")
            seq = self._seq
            self._seq += 1
            self._calls += 1
        try:
            self.store.set(f"{g}/r{me}/q{seq}", {"op": op, "shard": shard_id, "timeout": timeout, **extra})
            self.store.add(f"{g}/requests", 1)
            resp = self._answer(f"{g}/r{me}/a{seq}", f"{op} {shard_name(shard_id)}")
        finally:
            with self._lock:
                self._calls -= 1
                self._lock.notify_all()
        if not resp.get("ok"):
            raise_payload(resp, f"the node leader of {g} (rank {self.group.leader_rank})")
        return resp

    def _answer(self, key, what):
        poll, last_check = POLL_MIN, time.monotonic()
        while True:
            if self._stopped:
                raise DownloaderStopped(f"{what}: {self!r} was stopped before the node leader answered")
            resp = self.store.pop(key)
            if resp is not None:
                return resp
            now = time.monotonic()
            if now - last_check >= BEAT_EVERY:
                last_check = now
                self._check_leader(what)
            time.sleep(poll)
            poll = min(POLL_MAX, poll * 1.5)

    def wait_for_shard(self, shard_id, timeout=None, *, reader=None):
        return Path(self._call("wait", shard_id, timeout)["path"])

    def release(self, shard_id, *, reader=None, consumed=True):
        with self._lock:
            if self._stopped:       # the leader lets every lease go when it stops: nothing to hand back
                return
        try:
            self._call("release", shard_id, consumed=bool(consumed))
        except DownloaderStopped:   # stopped while the release was in flight: the same
            pass

    mark_consumed = release


# -----------------------------------------------------------------------------------------------------
# The factory

def make_node_downloader(*, partition="global", scope="node", timeout=None, info=None, **downloader_kwargs):
    """The downloader this process's loader should use (see the module docstring). Not started: use it
    as a context manager (or call start()/stop()) on every rank.

    partition: "global" (nanochat's: every node reads every shard, row groups strided over all ranks) or
               "node" (node n reads shards n, n+N, ..., row groups strided over its local ranks).
    scope:     "node" (one downloader per node, node-local cache) or "cluster" (one for the whole job:
               a cache dir shared by every node).
    timeout:   seconds a silent peer (or a rank that never asks for its first shard) is waited for
               (default torchrun.DEFAULT_TIMEOUT, 300; the edges pass SHARDSTREAM_DIST_TIMEOUT).
    downloader_kwargs: StreamingDownloader's arguments (total_shards, buffer_size, data_dir, source, ...).
    """
    from .downloader import StreamingDownloader
    from .source import Source
    from .listing import make_source
    info = node_info() if info is None else info
    if partition not in PARTITIONS:
        raise ConfigError(f"partition must be one of {', '.join(PARTITIONS)}, got {partition!r}")
    if scope == "cluster" and partition == "node":
        raise ConfigError("scope='cluster' (one downloader for a shared cache dir) streams every shard: "
                          "use it with partition='global'")
    timeout = DEFAULT_TIMEOUT if timeout is None else float(timeout)
    group = Group.of(info, scope)

    src = downloader_kwargs.pop("source", None)
    picks = {k: downloader_kwargs.pop(k) for k in ("files", "val_files", "manifest")
             if downloader_kwargs.get(k) is not None}
    downloader_kwargs = {k: v for k, v in downloader_kwargs.items() if k not in ("files", "val_files", "manifest")}
    if src is None or isinstance(src, str):
        # every rank makes the same Source (a listed one is listed by each: the leader checks they agree)
        src = make_source(src, **{k: downloader_kwargs.pop(k) for k in ("dataset", "dataset_shards")
                                  if k in downloader_kwargs}, **picks)
    elif not isinstance(src, Source):
        raise ConfigError(f"source must be a Source or a base URL string, got {type(src).__name__}")
    elif picks:
        raise ConfigError(f"{', '.join(picks)} pick(s) the files of a source URL, but source is a Source already "
                          f"({src.name}): pass them to make_source(url, files=..., val_files=..., manifest=...), "
                          f"or give the URL as source=")
    downloader_kwargs.pop("dataset", None)
    downloader_kwargs.pop("dataset_shards", None)

    total = downloader_kwargs.pop("total_shards", -1)
    if total is None or total == -1:
        total = src.num_train_shards
    stride = None
    if partition == "node":
        downloader_kwargs["plan"] = _read_plan(node_shards(total, info.node_rank, info.num_nodes),
                                               downloader_kwargs)
        stride = (info.local_rank, info.local_world_size)
    else:
        downloader_kwargs["total_shards"] = total

    if not info.distributed:
        return StreamingDownloader(source=src, **downloader_kwargs)     # its start() pins the source
    # every rank pins the default source (the Hub at a branch) now, so the leader and its readers agree on
    # the commit before the leader's start()
    from .listing import pin_when_reachable
    src = pin_when_reachable(src)
    store = open_store(timeout)
    if group.is_leader:
        return NodeLeader(StreamingDownloader(source=src, **downloader_kwargs), group, store, timeout, stride)
    return NodeReader(group, store, src, timeout)


def _read_plan(order, kwargs):
    """A node's ReadPlan: its shards, once (or forever when the window cycles)."""
    from .cache import ReadPlan
    from .downloader import WindowPolicy
    window = kwargs.get("window")
    cycle = isinstance(window, WindowPolicy) and window.cycle
    return ReadPlan(tuple(order), None if cycle else 1)
