"""Many GPUs, many nodes: one downloader per node, readers through torch.distributed's store, node
partitioning, and a DDP resume that needs only rank 0's loader state.

Under torchrun every process calls the same factory:

    dl = make_node_downloader(total_shards=100, buffer_size=5, max_cache_bytes=20e9)   # every rank
    with dl:
        loader = tokenizing_distributed_data_loader_with_state_bos_bestfit(..., streaming_downloader=dl)

- On the node leader (local rank 0) it returns a `NodeLeader`: the node's one StreamingDownloader, plus a
  coordinator thread that takes the other local ranks' requests from the store and calls
  `wait_for_shard(i, reader=local_rank)` / `release(i, reader=local_rank)` on their behalf. The first
  local rank to ask for a train shard also leases it for every local rank still behind it, so a shard is
  deleted only after every local rank released it, however far a slow rank lags (within the budget).
- On every other local rank it returns a `NodeReader`: the same reader interface (wait_for_shard, release,
  val_shard, source, data_dir, plan, get_status, start/stop, context manager) that publishes requests and
  waits for the leader's answer. It never touches the network or the cache itself.
- Outside torchrun (one process) it returns a plain StreamingDownloader.

Messages travel through the key-value store torchrun already runs (a TCPStore at MASTER_ADDR:MASTER_PORT;
we open our own client connection, so our polling never holds the process group's client), never
through NCCL/gloo collectives, which would interleave with training's collectives. Every store operation
is non-blocking (check/get/set/add) and waits poll, so nothing here can block a thread inside the store.

Liveness: the leader and every reader bump a heartbeat counter each second. A reader whose leader stops
beating for `timeout` seconds raises RankLost; a downloader error on the leader (a failed shard, a crash,
the disk floor) is sent back and raised in the reader as the same exception class; a leader that stops
tells its readers (DownloaderStopped).

`partition="node"`: node n reads only shards n, n+N, ... (N nodes), row groups strided over its local
ranks, so each node downloads and stores 1/N of the corpus (the loader asks the downloader's `plan` and
`row_group_stride`). `scope="cluster"`: one downloader for the whole job (global rank 0) for a cache
directory shared by every node (NFS); every other rank is a reader of it.

`LoaderSync` is what the loader calls under DDP: each rank publishes its per-batch loader state to the
store, and rank 0's state for batch k carries every rank's state for batch k, so handing rank 0's state to
every rank (nanochat's protocol) resumes each one bitwise where it was. Given a state made at another
world size it resumes elastically: no row group of the interrupted epoch is read twice or skipped
(docs/DISTRIBUTED.md says what is exact and what is not).
"""
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from . import errors
from .errors import ConfigError, DownloaderStopped, RankLost, ShardStreamError, StateMismatchError
from .shards import shard_name

logger = logging.getLogger(__name__)
P = "[shardstream.distributed]"

PARTITIONS = ("global", "node")     # global: nanochat's (every node reads every shard); node: 1/N per node
SCOPES = ("node", "cluster")        # one downloader per node, or one for the job (shared cache dir)
DEFAULT_TIMEOUT = 300.0             # seconds a peer may stay silent before we call it lost
BEAT_EVERY = 1.0                    # heartbeat period
POLL_MIN, POLL_MAX = 0.005, 0.1     # store polling interval: fast after activity, slower when idle


def _env_timeout():
    v = os.environ.get("SHARDSTREAM_DIST_TIMEOUT")
    if v is None:
        return DEFAULT_TIMEOUT
    try:
        t = float(v)
        if t <= 0:
            raise ValueError
        return t
    except ValueError:
        raise ConfigError(f"SHARDSTREAM_DIST_TIMEOUT must be a number of seconds > 0, got {v!r}") from None


# -----------------------------------------------------------------------------------------------------
# Who am I

@dataclass(frozen=True)
class NodeInfo:
    """This process's place in the job (torchrun's environment variables)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    num_nodes: int = 1

    @property
    def distributed(self):
        return self.world_size > 1


def node_info(env=None):
    """NodeInfo from RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK (torchrun sets them all);
    one process when RANK is unset."""
    env = os.environ if env is None else env
    if "RANK" not in env:
        return NodeInfo()

    def get(name, default=None):
        v = env.get(name, default)
        try:
            return int(v)
        except (TypeError, ValueError):
            raise ConfigError(f"environment variable {name}={v!r} is not an integer: launch with torchrun, "
                              f"or set RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE") from None

    rank, world = get("RANK"), get("WORLD_SIZE", 1)
    local_rank = get("LOCAL_RANK", 0)
    local_world = get("LOCAL_WORLD_SIZE", world if "LOCAL_RANK" not in env else None)
    node = get("GROUP_RANK", rank // local_world)
    if not (0 <= rank < world and 0 <= local_rank < local_world and world % local_world == 0):
        raise ConfigError(f"inconsistent torchrun environment: RANK={rank} WORLD_SIZE={world} LOCAL_RANK="
                          f"{local_rank} LOCAL_WORLD_SIZE={local_world} (every node must run the same number "
                          f"of processes)")
    return NodeInfo(rank, world, local_rank, local_world, node, world // local_world)


def setup_ddp(device_type=None):
    """Under torchrun: init the default process group (nccl on CUDA, gloo otherwise) and, on CUDA, pick
    this local rank's GPU. Returns (NodeInfo, device). One process: no process group, ("cuda"|"cpu")."""
    import torch
    import torch.distributed as dist
    info = node_info()
    cuda = (device_type or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    device = torch.device("cuda", info.local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if info.distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return info, device


def node_shards(total_shards, node_rank, num_nodes):
    """partition="node": the train shards node `node_rank` of `num_nodes` reads, in order."""
    shards = list(range(node_rank, total_shards, num_nodes))
    if not shards:
        raise ConfigError(f"node {node_rank} of {num_nodes} gets none of the {total_shards} train shards with "
                          f"partition='node': stream at least {num_nodes} shards, or use partition='global'")
    return shards


# -----------------------------------------------------------------------------------------------------
# The store: our own client of torchrun's TCPStore, every operation non-blocking

def open_store(timeout=None, prefix=None):
    """A client of the job's TCPStore (MASTER_ADDR:MASTER_PORT), namespaced per run and restart."""
    import torch.distributed as dist
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        raise ConfigError("MASTER_ADDR/MASTER_PORT are not set: run under torchrun (or set them to the job's "
                          "TCPStore) to use shardstream's multi-process mode")
    timeout = _env_timeout() if timeout is None else timeout
    try:
        client = dist.TCPStore(addr, int(port), is_master=False, timeout=timedelta(seconds=timeout))
    except (RuntimeError, ValueError) as e:
        raise RankLost(f"cannot reach the job's key-value store at {addr}:{port} within {timeout:g} s ({e}): "
                       f"is the torchrun agent (or rank 0) running?") from None
    if prefix is None:
        prefix = (f"shardstream/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/"
                  f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/")
    return Store(dist.PrefixStore(prefix, client))


class Store:
    """JSON values over a torch.distributed store, one lock around each (quick, non-blocking) operation."""

    def __init__(self, store):
        self.store = store
        self.lock = threading.Lock()

    def set(self, key, value):
        with self.lock:
            self.store.set(key, json.dumps(value, separators=(",", ":")))

    def get(self, key, default=None):
        """The value of key, or default when it does not exist (never blocks)."""
        with self.lock:
            if not self.store.check([key]):
                return default
            return json.loads(self.store.get(key))

    def pop(self, key, default=None):
        with self.lock:
            if not self.store.check([key]):
                return default
            v = json.loads(self.store.get(key))
            self.store.delete_key(key)
            return v

    def delete(self, key):
        with self.lock:
            self.store.delete_key(key)

    def has(self, keys):
        with self.lock:
            return self.store.check(list(keys))

    def get_many(self, keys):
        with self.lock:
            return [json.loads(v) for v in self.store.multi_get(list(keys))]

    def add(self, key, n=1):
        with self.lock:
            return self.store.add(key, n)


class Heartbeat:
    """A thread bumping `key` every BEAT_EVERY s (and calling `extra()` each time, for status)."""

    def __init__(self, store, key, extra=None):
        self.store, self.key, self.extra = store, key, extra
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"shardstream-beat-{key}", daemon=True)

    def start(self):
        self.store.add(self.key, 1)
        self.thread.start()

    def _run(self):
        while not self.stop_event.wait(BEAT_EVERY):
            try:
                self.store.add(self.key, 1)
                if self.extra is not None:
                    self.extra()
            except Exception as e:          # the store is gone: the job is ending
                logger.debug(f"{P} heartbeat {self.key} stopped: {e}")
                return

    def stop(self):
        # Joined, not just signalled: a daemon thread still inside a TCPStore call when the interpreter
        # finalizes aborts the process ("terminate called without an active exception").
        self.stop_event.set()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout=BEAT_EVERY + 5)


class Watch:
    """Whether a peer's heartbeat still moves: lost() once it has not moved for `timeout` s."""

    def __init__(self, store, key, timeout):
        self.store, self.key, self.timeout = store, key, timeout
        self.value = None
        self.since = time.monotonic()

    def lost(self):
        now = time.monotonic()
        v = self.store.add(self.key, 0)
        if v != self.value:
            self.value, self.since = v, now
            return False
        return now - self.since > self.timeout

    def silent_for(self):
        return time.monotonic() - self.since


def _error_payload(e):
    return {"ok": False, "type": type(e).__name__, "message": str(e), "shard": getattr(e, "shard_id", None)}


def _raise_payload(resp, who):
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


def _delegated(name):
    """A read-only property passing `name` through to self.downloader."""
    return property(lambda self: getattr(self.downloader, name), doc=f"the downloader's {name}")


class NodeLeader:
    """The group's one StreamingDownloader, serving the other members' requests from the store.

    Its own reader interface is reader 0 (the leader process's loader)."""

    def __init__(self, downloader, group, store, timeout, plan_order, row_group_stride):
        self.downloader = downloader
        self.group = group
        self.store = store
        self.timeout = timeout
        self.plan_order = tuple(plan_order)
        self._stride = row_group_stride
        self._index = {s: k for k, s in enumerate(self.plan_order)}
        self._cond = threading.Condition()
        self._pos = {}                  # reader -> position of the train shard it asked for last
        self._pre = {}                  # reader -> {position: shard} leased for it before it asked
        self._stop = threading.Event()
        self._beat = Heartbeat(store, f"{group.key}/beat/0", extra=self._publish_status)
        self._thread = None
        self._started = False

    # --- the reader interface (reader 0), delegated
    source = _delegated("source")
    data_dir = _delegated("data_dir")
    val_shard = _delegated("val_shard")
    total_shards = _delegated("total_shards")
    buffer_size = _delegated("buffer_size")
    plan = _delegated("plan")

    def row_group_stride(self, split):
        """(rank, world) the loader strides row groups by for `split` (None: the DDP rank and world)."""
        return self._stride if split == "train" else None

    def get_status(self):
        return self.downloader.get_status()

    def wait_for_shard(self, shard_id, timeout=None, *, reader=0):
        """Lease shard_id to `reader`. The first member to ask for a train shard also leases it for every
        member still behind it (a "pre-lease"), so it is deleted only once all of them released it."""
        dl = self.downloader
        if shard_id not in self._index or len(self.group.members) == 1:
            return dl.wait_for_shard(shard_id, timeout, reader=reader)
        with self._cond:
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
            with self._cond:
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
            self.store.set(f"{g}/leader", {"state": "error", **_error_payload(e)})
            self._beat.stop()
            raise
        plan = getattr(self.downloader, "plan", None)
        self.store.set(f"{g}/leader", {
            "state": "ready", "pid": os.getpid(), "host": socket.gethostname(),
            "data_dir": str(self.downloader.data_dir), "source": self.source.identity(),
            "plan": list(self.plan_order), "epochs": getattr(plan, "epochs", 1),
            "total_shards": self.downloader.total_shards, "buffer_size": self.downloader.buffer_size,
            "stride": self._stride})
        self._publish_status()
        self._thread = threading.Thread(target=self._serve, name="shardstream-node-leader", daemon=True)
        self._thread.start()
        logger.info(f"{P} node leader ready: one downloader for readers {list(self.group.members)} "
                    f"({self.group.key}), data dir {self.downloader.data_dir}")
        return self

    def stop(self):
        if self._stop.is_set():
            return
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        try:
            self.store.set(f"{self.group.key}/leader", {"state": "stopped", "pid": os.getpid()})
        except Exception as e:
            logger.debug(f"{P} could not tell the readers the leader stopped: {e}")
        self._beat.stop()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.downloader.stop()

    # --- serving the followers
    def _publish_status(self):
        try:
            self.store.set(f"{self.group.key}/status", self.downloader.get_status().to_dict())
        except Exception as e:
            logger.debug(f"{P} could not publish the status: {e}")

    def _serve(self):
        g = self.group.key
        followers = [m for m in self.group.members if m != 0]
        nxt = {m: 0 for m in followers}
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
                for m in followers:
                    while True:
                        req = self.store.pop(f"{g}/r{m}/q{nxt[m]}")
                        if req is None:
                            break
                        seq, nxt[m] = nxt[m], nxt[m] + 1
                        threading.Thread(target=self._handle, args=(m, seq, req), daemon=True,
                                         name=f"shardstream-serve-r{m}").start()
            except Exception as e:
                if self._stop.is_set():
                    return
                logger.error(f"{P} the node leader's coordinator lost the store ({e}); readers will stop")
                return

    def _handle(self, reader, seq, req):
        op, shard = req.get("op"), req.get("shard")
        try:
            if op == "wait":
                path = self.wait_for_shard(shard, req.get("timeout"), reader=reader)
                resp = {"ok": True, "path": str(path)}
            elif op == "release":
                self.release(shard, reader=reader, consumed=req.get("consumed", True) is not False)
                resp = {"ok": True}
            else:
                raise ConfigError(f"unknown request {op!r} from reader {reader}")
        except Exception as e:
            logger.debug(f"{P} request {op} {shard} from reader {reader} failed: {type(e).__name__}: {e}")
            resp = _error_payload(e)
        try:
            self.store.set(f"{self.group.key}/r{reader}/a{seq}", resp)
        except Exception as e:
            logger.debug(f"{P} could not answer reader {reader}: {e}")


class NodeReader:
    """A local rank's view of the node leader's downloader: the reader interface over the store."""

    def __init__(self, group, store, source, timeout):
        self.group = group
        self.store = store
        self._source = source
        self.timeout = timeout
        self._lock = threading.Lock()
        self._seq = 0
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
        self._stopped = True
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
            _raise_payload(st, f"the node leader of {self.group.key} while starting")
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
        if self._stopped:
            raise DownloaderStopped(f"{self!r} was stopped")
        self._ready()
        g, me = self.group.key, self.group.me
        with self._lock:
            seq = self._seq
            self._seq += 1
            self.store.set(f"{g}/r{me}/q{seq}", {"op": op, "shard": shard_id, "timeout": timeout, **extra})
            self.store.add(f"{g}/requests", 1)
        key = f"{g}/r{me}/a{seq}"
        poll, last_check = POLL_MIN, time.monotonic()
        while True:
            resp = self.store.pop(key)
            if resp is not None:
                break
            now = time.monotonic()
            if now - last_check >= BEAT_EVERY:
                last_check = now
                self._check_leader(f"{op} {shard_name(shard_id)}")
            time.sleep(poll)
            poll = min(POLL_MAX, poll * 1.5)
        if not resp.get("ok"):
            _raise_payload(resp, f"the node leader of {g} (rank {self.group.leader_rank})")
        return resp

    def wait_for_shard(self, shard_id, timeout=None, *, reader=None):
        return Path(self._call("wait", shard_id, timeout)["path"])

    def release(self, shard_id, *, reader=None, consumed=True):
        self._call("release", shard_id, consumed=bool(consumed))

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
               (default SHARDSTREAM_DIST_TIMEOUT or 300).
    downloader_kwargs: StreamingDownloader's arguments (total_shards, buffer_size, data_dir, source, ...).
    """
    from .downloader import StreamingDownloader
    from .source import Source, make_source
    info = node_info() if info is None else info
    if partition not in PARTITIONS:
        raise ConfigError(f"partition must be one of {', '.join(PARTITIONS)}, got {partition!r}")
    if scope == "cluster" and partition == "node":
        raise ConfigError("scope='cluster' (one downloader for a shared cache dir) streams every shard: "
                          "use it with partition='global'")
    timeout = _env_timeout() if timeout is None else float(timeout)
    group = Group.of(info, scope)

    src = downloader_kwargs.pop("source", None)
    if src is None or isinstance(src, str):
        src = make_source(src, **{k: downloader_kwargs.pop(k) for k in ("dataset", "dataset_shards")
                                  if k in downloader_kwargs})
    elif not isinstance(src, Source):
        raise ConfigError(f"source must be a Source or a base URL string, got {type(src).__name__}")
    downloader_kwargs.pop("dataset", None)
    downloader_kwargs.pop("dataset_shards", None)

    total = downloader_kwargs.pop("total_shards", -1)
    if total is None or total == -1:
        total = src.num_train_shards
    stride = None
    if partition == "node":
        order = node_shards(total, info.node_rank, info.num_nodes)
        stride = [info.local_rank, info.local_world_size]
    else:
        order = list(range(total))

    if not info.distributed:
        if partition == "node":
            downloader_kwargs["plan"] = _read_plan(order, downloader_kwargs)
        else:
            downloader_kwargs["total_shards"] = total
        return StreamingDownloader(source=src, **downloader_kwargs)

    store = open_store(timeout)
    if group.is_leader:
        if partition == "node":
            downloader_kwargs["plan"] = _read_plan(order, downloader_kwargs)
        else:
            downloader_kwargs["total_shards"] = total
        dl = StreamingDownloader(source=src, **downloader_kwargs)
        return NodeLeader(dl, group, store, timeout, order, stride)
    return NodeReader(group, store, src, timeout)


def _read_plan(order, kwargs):
    try:
        from .cache import ReadPlan
    except ImportError:
        raise ConfigError("partition='node' needs a StreamingDownloader that accepts plan= (shardstream.cache."
                          "ReadPlan): update shardstream") from None
    window = kwargs.get("window")
    cycle = bool(getattr(window, "cycle", False))
    return ReadPlan(tuple(order), None if cycle else 1)


# -----------------------------------------------------------------------------------------------------
# DDP resume from rank 0's state alone

STATE_KEEP = 64         # batch records a rank keeps in the store behind its latest one
ANCHORS_KEEP = 3        # anchor states a rank keeps in the store
_loader_count = {}      # split -> train loaders with state sharing made by this process (store namespace)


def _key(c):
    return tuple(int(x) for x in c)


class LoaderSync:
    """What the loader does under DDP (and when resuming from a state made under DDP).

    Publishing (every rank but 0, each batch k): a small record {anchor batch a, replay, cursor, nanochat
    keys} under r<R>/b<k>, and its full state under r<R>/a<a> whenever the loader made a new anchor a.
    Rank 0 waits (bounded) for every rank's record of batch k and yields a state that is its own plus
    "ddp": {"world_size", "batch": k, "ranks": [state of rank r for batch k, ...], "elastic": [...]}.

    Resuming from such a state at the same world size: rank r resumes from ranks[r] (bitwise). At another
    world size: every rank starts the interrupted epoch again from the earliest old cursor with empty
    buffers, skipping every row (group) some old rank had read before batch k (`rows_read`)."""

    def __init__(self, info, rank, world, resume_state, rows_read, batch, layers, share, timeout):
        self.info = info
        self.rank, self.world = rank, world
        self.resume_state = resume_state
        self.rows_read = rows_read
        self.batch = batch
        self.layers = layers
        self.share = share
        self.timeout = timeout
        self.store = None
        self.ns = None

    @classmethod
    def for_loader(cls, split, rank, world, fingerprint, resume_state_dict):
        """None unless this train loader runs under torchrun (world > 1) or resumes from a DDP state."""
        if split != "train":
            return None
        info = node_info()
        share = (info.world_size > 1 and bool(os.environ.get("MASTER_ADDR"))
                 and os.environ.get("SHARDSTREAM_SHARE_STATE", "1") != "0")
        has_ddp = isinstance(resume_state_dict, dict) and isinstance(resume_state_dict.get("ddp"), dict)
        if not share and not has_ddp:
            return None
        state, rows_read, batch, layers = resume_state_dict, None, 0, []
        if has_ddp:
            state, batch, layers = cls._own_state(resume_state_dict, info, rank, world, fingerprint)
            rows_read = _rows_read_fn(layers) if layers else None
        sync = cls(info, rank, world, state, rows_read, batch, layers, share, _env_timeout())
        if share:
            n = _loader_count.get(split, 0)
            _loader_count[split] = n + 1
            sync.store = open_store(sync.timeout)
            sync.ns = f"loader/{split}/{n}"
        return sync

    @staticmethod
    def _own_state(state, info, rank, world, fingerprint):
        ddp = state["ddp"]
        try:
            old_world, batch, ranks = int(ddp["world_size"]), int(ddp["batch"]), ddp["ranks"]
            layers = list(ddp.get("elastic", []))
            if len(ranks) != old_world:
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise StateMismatchError("resume state has a malformed 'ddp' section: it is not a state this "
                                     "loader yielded") from None
        if old_world == info.world_size:
            me = info.rank
            own = ranks[me]
            if own is None:         # rank 0 did not get this rank's state in time: nanochat's approximate resume
                return {k: v for k, v in ranks[0].items() if k not in ("version", "ddp")}, batch, layers
            if own.get("rank") != rank:
                raise StateMismatchError(f"the resume state's entry for rank {me} belongs to loader rank "
                                         f"{own.get('rank')}, this loader is rank {rank}: resume with the same "
                                         f"partition and ranks per node")
            return own, batch, layers
        # elastic: the world size changed
        for r, entry in enumerate(ranks):
            fp = entry.get("fingerprint", {})
            if fp.get("world_size") != old_world or entry.get("rank") != r:
                raise StateMismatchError(f"elastic resume ({old_world} -> {info.world_size} ranks) needs a state "
                                         f"made with partition='global' (row groups strided over all ranks)")
            for key, value in fingerprint.items():
                if key != "world_size" and fp.get(key) != value:
                    raise StateMismatchError(
                        f"resume state does not match this loader: {key} was {fp.get(key)!r} when the state "
                        f"was saved, now {value!r}. Resume with the same {key}")
            if entry.get("cursor") is None:
                raise StateMismatchError("the resume state has no per-rank cursor (made by an older shardstream):"
                                         " elastic resume needs one")
        if world != info.world_size:
            raise StateMismatchError(f"elastic resume needs partition='global' (the loader strides over "
                                     f"{world} ranks, the job has {info.world_size})")
        layers.append({"world_size": old_world, "cursors": [list(e["cursor"]) for e in ranks]})
        epoch, pq_idx = min(_key(c)[:2] for c in layers[-1]["cursors"])
        logger.warning(f"{P} elastic resume: {old_world} -> {world} ranks; epoch {epoch} goes on from shard index "
                       f"{pq_idx} without the row groups the old ranks had read (their packing buffers are "
                       f"dropped: see docs/DISTRIBUTED.md)")
        own = {"version": ranks[0].get("version"), "fingerprint": dict(fingerprint), "rank": rank,
               "pq_idx": pq_idx, "rg_idx": rank, "epoch": epoch, "replay": 0,
               "anchor": {"cursor": [epoch, pq_idx, rank, 0], "last": [epoch, pq_idx, 0], "docs": []}}
        return own, batch, layers

    # --- publishing and gathering
    def wrap(self, gen):
        k = self.batch
        rank = self.info.rank
        anchors = []                    # (batch, anchor object) this rank published, newest last
        cache = {}                      # (rank, anchor batch) -> state (rank 0)
        slow = False
        try:
            for x, y, st in gen:
                rec = {"a": k - st["replay"], "replay": st["replay"], "cursor": st.get("cursor"),
                       "pq_idx": st["pq_idx"], "rg_idx": st["rg_idx"], "epoch": st["epoch"]}
                if self.share and rank != 0:
                    if not anchors or anchors[-1][1] is not st["anchor"]:
                        a = rec["a"]
                        self.store.set(f"{self.ns}/r{rank}/a{a}", {k_: v for k_, v in st.items() if k_ != "ddp"})
                        anchors.append((a, st["anchor"]))
                        if len(anchors) > ANCHORS_KEEP:
                            self.store.delete(f"{self.ns}/r{rank}/a{anchors.pop(0)[0]}")
                    self.store.set(f"{self.ns}/r{rank}/b{k}", rec)
                    if k - STATE_KEEP >= self.batch:
                        self.store.delete(f"{self.ns}/r{rank}/b{k - STATE_KEEP}")
                    out = st
                elif rank == 0:
                    ranks = [st]
                    if self.share:
                        recs, slow = self._gather(k, slow)
                        for r, rc in enumerate(recs, start=1):
                            if rc is None:
                                ranks.append(None)
                                continue
                            full = cache.get((r, rc["a"]))
                            if full is None:
                                full = self.store.get(f"{self.ns}/r{r}/a{rc['a']}")
                                cache = {key: v for key, v in cache.items() if key[0] != r}
                                cache[(r, rc["a"])] = full
                            ranks.append(None if full is None else {
                                **full, "replay": rc["replay"], "cursor": rc["cursor"], "pq_idx": rc["pq_idx"],
                                "rg_idx": rc["rg_idx"], "epoch": rc["epoch"]})
                    exact = all(e is not None for e in ranks)
                    out = {**st, "ddp": {"world_size": self.info.world_size, "batch": k, "exact": exact,
                                         "ranks": ranks, "elastic": self.layers}}
                else:
                    out = st
                yield x, y, out
                k += 1
        finally:
            gen.close()

    def _gather(self, k, slow):
        """Every other rank's record of batch k (None for a rank that did not publish it in time)."""
        keys = [f"{self.ns}/r{r}/b{k}" for r in range(1, self.info.world_size)]
        limit = 1.0 if slow else self.timeout
        t0, poll = time.monotonic(), POLL_MIN / 5
        while not self.store.has(keys):
            if time.monotonic() - t0 > limit:
                have = [self.store.get(key) for key in keys]
                missing = [r for r, v in enumerate(have, start=1) if v is None]
                logger.warning(f"{P} rank(s) {missing} did not publish their loader state for batch {k} within "
                               f"{limit:g} s: rank 0's state for this batch cannot resume them exactly")
                return have, True
            time.sleep(poll)
            poll = min(POLL_MAX / 5, poll * 2)
        return self.store.get_many(keys), False


def _rows_read_fn(layers):
    """(epoch, pq_idx, rg_idx) -> rows the old ranks read from that row group before the resume: 0, a row
    count, or None for all of it. Each layer is one earlier world size and its ranks' cursors."""
    prepared = [(layer["world_size"], [_key(c) for c in layer["cursors"]]) for layer in layers]

    def rows_read(epoch, pq_idx, rg_idx):
        done = 0
        for w, cursors in prepared:
            c = cursors[rg_idx % w]
            u = (epoch, pq_idx, rg_idx)
            if u < c[:3]:
                return None
            if u == c[:3]:
                done = max(done, c[3])
        return done
    return rows_read
