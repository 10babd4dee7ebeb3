"""The reader interface (shardstream/reader.py): who satisfies it, and that the loader needs nothing else.

- StreamingDownloader, NodeLeader and NodeReader have every ShardReader member, with the protocol's
  signatures, and are ShardReaders by isinstance (the node ones over an in-process store: no torchrun).
- The loader over a minimal hand-written ShardReader of a local dir (shardstream.sample) yields the
  batches it yields from that dir, and resumes exactly: it asks the reader for nothing beyond the protocol.
- The node leader serves a follower with one handler (a fixed set of threads, whatever the number of
  requests), in order; a follower's val wait is not queued behind its blocked train wait; leader errors
  and bounded waits come back to the follower as the same exception class; a stop ends a follower's wait.
"""
import inspect
import threading
import time
from collections import Counter

import pytest
import torch.distributed as dist

from nanochat_like import ByteTokenizer
from shardstream.cache import ReadPlan
from shardstream.distributed import Group, NodeLeader, NodeReader, Store
from shardstream.downloader import StreamingDownloader
from shardstream.errors import ConfigError, DownloaderStopped, ShardWaitTimeout
from shardstream.loader import tokenizing_distributed_data_loader_with_state_bos_bestfit as loader_fn
from shardstream.reader import ShardReader
from shardstream.sample import make_sample
from shardstream.shards import shard_name
from shardstream.listing import make_source
from shardstream.status import DownloaderStatus

SHARDS = 5              # 4 train + 1 val
KW = dict(B=4, T=64, tokenizer_threads=1, tokenizer_batch_size=8, buffer_size=24, device="cpu")

METHODS = ("row_group_stride", "wait_for_shard", "release", "get_status", "start", "stop", "__enter__", "__exit__")
PROPERTIES = ("source", "data_dir", "val_shard", "total_shards", "plan")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("protocol_shards")
    make_sample(d, SHARDS, 40_000, seed=3, docs_per_row_group=16, row_groups=3)
    return d


class TinySource:
    """All the loader asks of a source: its identity (for the resume fingerprint)."""

    def __init__(self, name):
        self.name = name

    def identity(self):
        return {"source": self.name}


class LocalReader:
    """A minimal hand-written ShardReader: the shards of a local dir, leases counted, nothing fetched.
    `gates[shard]` (an Event) makes a wait for that shard block until it is set."""

    def __init__(self, directory, n_train):
        self._dir = directory
        self._plan = ReadPlan(tuple(range(n_train)), None)
        self._source = TinySource(f"local:{directory.name}")
        self.leases = Counter()             # (reader, shard) -> leases held
        self.released = []                  # (reader, shard, consumed)
        self.gates = {}
        self.buffer_size = 1                # NodeLeader publishes it
        self._stopped = threading.Event()
        self._lock = threading.Lock()

    source = property(lambda self: self._source)
    data_dir = property(lambda self: self._dir)
    val_shard = property(lambda self: self._plan.epoch_length)
    val_shards = property(lambda self: (self._plan.epoch_length,))
    text_column = "text"
    total_shards = property(lambda self: self._plan.epoch_length)
    plan = property(lambda self: self._plan)

    def row_group_stride(self, split):
        return None

    def wait_for_shard(self, shard_id, timeout=None, *, reader=0):
        if not (shard_id in self._plan or shard_id == self.val_shard):
            raise ConfigError(f"no shard {shard_id} here")
        gate = self.gates.get(shard_id)
        t0 = time.monotonic()
        while gate is not None and not gate.is_set():
            if self._stopped.is_set():
                raise DownloaderStopped("stopped")
            if timeout is not None and time.monotonic() - t0 >= timeout:
                raise ShardWaitTimeout(f"{shard_name(shard_id)} was not ready within {timeout:g} s")
            gate.wait(0.02)
        with self._lock:
            self.leases[reader, shard_id] += 1
        return self._dir / shard_name(shard_id)

    def release(self, shard_id, *, reader=0, consumed=True):
        with self._lock:
            if self.leases[reader, shard_id] <= 0:
                raise ConfigError(f"reader {reader} holds no lease on shard {shard_id}")
            self.leases[reader, shard_id] -= 1
            self.released.append((reader, shard_id, consumed))

    def held(self):
        with self._lock:
            return {k: v for k, v in self.leases.items() if v}

    def get_status(self):
        return DownloaderStatus("running", self.total_shards, self.total_shards, 0, 1, None, 0, 0, None, None,
                                0.0, 0)

    def start(self):
        return self

    def stop(self):
        self._stopped.set()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False


# -----------------------------------------------------------------------------------------------------
# who is a ShardReader

def signature_problems(cls):
    """Each protocol method on cls with the protocol's parameters (same names and kinds, defaults where
    the protocol has them, no extra required one); each property present (on the class or an instance)."""
    out = []
    for name in METHODS:
        have = inspect.getattr_static(cls, name, None)
        if not callable(have):
            out.append(f"{name}: missing")
            continue
        want = list(inspect.signature(getattr(ShardReader, name)).parameters.values())[1:]
        got = inspect.signature(getattr(cls, name)).parameters
        for p in want:
            if p.kind is p.VAR_POSITIONAL:
                if not any(q.kind is q.VAR_POSITIONAL for q in got.values()):
                    out.append(f"{name}: no *{p.name}")
                continue
            q = got.get(p.name)
            if q is None:
                out.append(f"{name}: no parameter {p.name}")
            elif q.kind is not p.kind and not (p.kind is p.KEYWORD_ONLY and q.kind is q.POSITIONAL_OR_KEYWORD):
                out.append(f"{name}: {p.name} is {q.kind.description}, not {p.kind.description}")
            elif p.default is not p.empty and q.default is q.empty:
                out.append(f"{name}: {p.name} has no default")
        names = {p.name for p in want}
        out += [f"{name}: extra required parameter {q.name}" for q in list(got.values())[1:]
                if q.name not in names and q.default is q.empty and q.kind not in (q.VAR_POSITIONAL, q.VAR_KEYWORD)]
    return out


@pytest.mark.parametrize("cls", [StreamingDownloader, NodeLeader, NodeReader, LocalReader])
def test_every_reader_has_the_protocols_methods(cls):
    assert signature_problems(cls) == []


def test_the_protocol_declares_what_the_loader_uses():
    declared = {n for n in dir(ShardReader) if not n.startswith("_") or n in ("__enter__", "__exit__")}
    assert set(METHODS) | set(PROPERTIES) <= declared


def in_process_node(downloader, followers=1):
    """A NodeLeader over `downloader` and its NodeReaders, talking through an in-process store."""
    store = Store(dist.PrefixStore("t/", dist.HashStore()))
    members = tuple(range(followers + 1))
    leader = NodeLeader(downloader, Group("node0", 0, 0, members), store, timeout=30)
    readers = [NodeReader(Group("node0", 0, m, members), store, downloader.source, timeout=30) for m in members[1:]]
    return leader, readers


def test_streaming_downloader_and_node_objects_are_shard_readers(shards, tmp_path):
    src = make_source(str(shards))
    dl = StreamingDownloader(source=src, data_dir=tmp_path / "cache", total_shards=SHARDS - 1, progress=False,
                             buffer_size=1, min_free_bytes=0, warn_free_bytes=0)
    assert isinstance(dl, ShardReader)
    leader, (follower,) = in_process_node(dl)
    with leader, follower:
        assert isinstance(leader, ShardReader) and isinstance(follower, ShardReader)
        assert follower.plan.order == leader.plan.order == tuple(range(SHARDS - 1))
        assert follower.data_dir == leader.data_dir and follower.val_shard == leader.val_shard == SHARDS - 1
        assert follower.total_shards == SHARDS - 1 and follower.row_group_stride("train") is None
        path = follower.wait_for_shard(1)
        assert path.is_file()
        follower.release(1)
    assert isinstance(LocalReader(shards, SHARDS - 1), ShardReader)


# -----------------------------------------------------------------------------------------------------
# the loader needs nothing beyond the protocol

def take(gen, n):
    out = []
    for _ in range(n):
        x, y, state = next(gen)
        out.append((x.numpy().tobytes(), y.numpy().tobytes(), state))
    return out


def test_loader_over_a_hand_written_reader(shards):
    tok = ByteTokenizer()
    ref = loader_fn(tok, split="train", data_dir=shards, **KW)
    want = take(ref, 60)
    ref.close()
    reader = LocalReader(shards, SHARDS - 1)
    gen = loader_fn(tok, split="train", streaming_downloader=reader, **KW)
    got = take(gen, 60)
    gen.close()
    assert [g[:2] for g in got] == [w[:2] for w in want]
    assert got[-1][2]["epoch"] >= 2                     # wrapped around the plan at least once
    assert {s for _, s, _ in reader.released} == set(range(SHARDS - 1))

    # resume from a state whose anchor holds buffered docs: re-read through the same reader, exact
    k = 45
    gen = loader_fn(tok, split="train", streaming_downloader=reader, resume_state_dict=got[k][2], **KW)
    assert [g[:2] for g in take(gen, 10)] == [g[:2] for g in got[k:k + 10]]
    gen.close()
    assert any(not consumed for _, _, consumed in reader.released)     # the resume's re-read: not consumed
    deadline = time.monotonic() + 5                     # the background reader ends after close()
    while reader.held() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert reader.held() == {}

    val = loader_fn(tok, split="val", streaming_downloader=reader, **KW)
    next(val)
    val.close()
    assert any(s == SHARDS - 1 for _, s, _ in reader.released)


# -----------------------------------------------------------------------------------------------------
# the leader's handler per follower

def serving_threads():
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("shardstream-serve-"))


def test_one_handler_per_follower_in_order(shards):
    inner = LocalReader(shards, SHARDS - 1)
    leader, followers = in_process_node(inner, followers=2)
    with leader:
        for f in followers:
            f.start()
        fixed = serving_threads()
        assert fixed == ["shardstream-serve-r1-other", "shardstream-serve-r1-plan",
                         "shardstream-serve-r2-other", "shardstream-serve-r2-plan"]
        for _ in range(3):
            for s in range(SHARDS - 1):
                for f in followers:
                    f.wait_for_shard(s)
                    f.release(s)
        assert serving_threads() == fixed            # no thread per request
        # follower 1 (always first: no pre-lease of its own to claim) released in the order it asked
        assert [s for r, s, _ in inner.released if r == 1] == list(range(SHARDS - 1)) * 3
        for f in followers:
            f.stop()
    assert serving_threads() == []                   # the leader's stop joined its handlers


def test_follower_errors_bounded_waits_val_lane_and_stop(shards):
    inner = LocalReader(shards, SHARDS - 1)
    inner.gates[2] = threading.Event()              # shard 2 "downloads" until the gate opens
    leader, (follower,) = in_process_node(inner)
    leader.start()
    follower.start()
    try:
        with pytest.raises(ConfigError, match="no shard 99 here"):
            follower.wait_for_shard(99)              # the leader's error, as the same class
        with pytest.raises(ShardWaitTimeout, match="within 0.3 s"):
            follower.wait_for_shard(2, timeout=0.3)  # a bounded wait, bounded on the leader

        blocked = {}

        def train_wait():
            try:
                blocked["path"] = follower.wait_for_shard(2)
            except Exception as e:
                blocked["error"] = e

        t = threading.Thread(target=train_wait)
        t.start()
        time.sleep(0.3)
        t0 = time.monotonic()
        path = follower.wait_for_shard(inner.val_shard)      # an evaluation while the train wait blocks
        assert time.monotonic() - t0 < 2 and path.name == shard_name(SHARDS - 1)
        follower.release(inner.val_shard)
        assert t.is_alive()
    finally:
        leader.stop()                                 # ends the handler's wait: DownloaderStopped comes back
    t.join(10)
    assert not t.is_alive() and isinstance(blocked.get("error"), DownloaderStopped)
    follower.stop()
    with pytest.raises(DownloaderStopped):
        follower.wait_for_shard(0)


def test_a_stopped_follower_ends_its_own_wait(shards):
    """stop() on a NodeReader ends a wait still polling for the leader's answer, and returns once no
    thread is inside a store call (one there at interpreter exit aborts the process)."""
    inner = LocalReader(shards, SHARDS - 1)
    inner.gates[1] = threading.Event()
    leader, (follower,) = in_process_node(inner)
    with leader:
        follower.start()
        errs = []
        t = threading.Thread(target=lambda: errs.append(pytest.raises(DownloaderStopped, follower.wait_for_shard, 1)))
        t.start()
        time.sleep(0.3)
        t0 = time.monotonic()
        follower.stop()
        assert time.monotonic() - t0 < 3
        t.join(3)
        assert not t.is_alive() and errs
        inner.gates[1].set()
