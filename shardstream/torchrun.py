"""torchrun plumbing: who this process is, the job's key-value store, heartbeats, timeouts.

Everything here is about the job, nothing about shards: `node_info()` reads torchrun's environment
(RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK), `setup_ddp()` starts the process group,
`open_store()` opens our own client of torchrun's TCPStore (MASTER_ADDR:MASTER_PORT) wrapped in `Store`
(JSON values, only non-blocking operations), `Heartbeat` bumps a counter every second and `Watch` tells
when a peer's counter stopped moving. node.py (the node leader and its readers) and loadersync.py (the
loader's DDP state) build on these; docs/DISTRIBUTED.md explains the whole.

Our own client connection means our polling never holds the process group's client, and only
check/get/set/add/delete are used (waits poll), so nothing here blocks a thread inside the store and no
collective is ever issued from a background thread (it would interleave with training's collectives).
"""
import json
import logging
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

from .errors import ConfigError, RankLost
from .settings import read, torchrun_env

logger = logging.getLogger(__name__)
P = "[shardstream.distributed]"

DEFAULT_TIMEOUT = 300.0             # seconds a peer may stay silent before we call it lost
BEAT_EVERY = 1.0                    # heartbeat period
POLL_MIN, POLL_MAX = 0.005, 0.1     # store polling interval: fast after activity, slower when idle


def dist_timeout(env=None):
    """SHARDSTREAM_DIST_TIMEOUT in seconds (default DEFAULT_TIMEOUT), for the edges to pass on as timeout=;
    ConfigError for a bad value."""
    t = read("SHARDSTREAM_DIST_TIMEOUT", env)
    return DEFAULT_TIMEOUT if t is None else t


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
    env = torchrun_env() if env is None else env
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


# -----------------------------------------------------------------------------------------------------
# The store: our own client of torchrun's TCPStore, every operation non-blocking

def open_store(timeout=DEFAULT_TIMEOUT, prefix=None):
    """A client of the job's TCPStore (MASTER_ADDR:MASTER_PORT), namespaced per run and restart."""
    import torch.distributed as dist
    env = torchrun_env()
    addr, port = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
    if not addr or not port:
        raise ConfigError("MASTER_ADDR/MASTER_PORT are not set: run under torchrun (or set them to the job's "
                          "TCPStore) to use shardstream's multi-process mode")
    timeout = DEFAULT_TIMEOUT if timeout is None else timeout
    try:
        client = dist.TCPStore(addr, int(port), is_master=False, timeout=timedelta(seconds=timeout))
    except (RuntimeError, ValueError) as e:
        raise RankLost(f"cannot reach the job's key-value store at {addr}:{port} within {timeout:g} s ({e}): "
                       f"is the torchrun agent (or rank 0) running?") from None
    if prefix is None:
        prefix = (f"shardstream/{env.get('TORCHELASTIC_RUN_ID', 'run')}/"
                  f"{env.get('TORCHELASTIC_RESTART_COUNT', '0')}/")
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
