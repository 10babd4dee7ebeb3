"""A discrete-event simulation of StreamingDownloader: the planner behind `shardstream plan`.

    sc = Scenario.uniform(shards=100, shard_mb=100, link_mb_per_s=100, consume_mb_per_s=1.7, budget_mb=2000)
    res = simulate(sc)           # -> Result: per node first step, data-wait, peak disk, wire bytes, window

The decisions are the downloader's own: schedule.py's pure functions (priority, next_action, make_room,
routine_evictions, window_room, fetch_size, transfer_limit) over a Snapshot built like
downloader._snapshot(), and prefetch.PrefetchController fed the simulated download and read times at the calls downloader.py makes
(transfer_started/ended, add_bytes, download_done, read_done, on_wait, on_read). What is simulated is
everything around them, on a simulated clock (no threads, no sleeps, no I/O):

- the link, one per node: W = `link.mb_per_s` shared fairly by the transfers moving bytes (each gets
  W / active, times its jitter factor drawn uniformly from [1 - jitter, 1 + jitter]); a HEAD takes
  `probe_latency_s`, a GET as long again before its first byte, `verify_s` after its last byte (footer
  check, rename), off the link (downloader._link: the next transfer may start); a token bucket's credit
  (`burst_s`, ShardServer's 50 ms) when the bench needs it; during an outage no byte moves and every try
  fails, a try without a byte leaves the link after `stall_s`; after it, each transfer's next try comes a
  draw from [0, retry_gap_s] late (fetch.py's backoff with full jitter); the failure policy ("fail")
  raises in a reader that waited `deadline_s` for a shard whose tries failed;
- the workers: `workers` + 1 threads (the last one kept for a shard a reader waits for), each running one
  probe or one transfer at a time, as downloader._next_job hands them out;
- start(): with a budget, the HEADs of the first shard and the val shard (the budget check), then only the
  initial buffer, which it waits for before returning;
- the readers: `ranks_per_node` ranks of a node read the node's shard sequence in lockstep, each holding a
  shard while reading it and asking for the next one when done (wait_for_shard / release per rank; each
  rank that waits is one on_wait, as the downloader counts them).

Consumption R (`consume_mb_per_s`) is the shard bytes one node trains on per second, all its ranks
together (a node training at T tokens/s on data of M tokens per MB: R = T / M). With partition="node"
node n reads whole shards n, n+K, ..., so a shard of S bytes takes S / R. With partition="global" every
node reads every shard but trains on 1/K of its row groups (strided over all K*G ranks), so it moves
through shards K times faster: S / (K * R) a shard, K * R MB/s of shard bytes through its link.

Definitions (as bench/streaming.py measures them): first_step_s from the downloader's creation to the
reader holding shard 0 of its plan; wait_fraction = the reader's blocked time after that / wall time after
it (wall ends when the last shard is released); peak disk counts verified files and the bytes received so
far of in-flight shards (the val shard's too); wire bytes are every byte received by the run's end.

Under partition="global" the nodes are identical when nothing random happens (no jitter, no outage), so
one is simulated for all. The simulation is deterministic for a given `seed`.
"""
import heapq
import math
import random
from collections import Counter
from dataclasses import dataclass, field, replace

from . import schedule
from .cache import ReadPlan
from .errors import ConfigError
from .prefetch import PrefetchController, PrefetchPolicy

MB = 1_000_000
PARTITIONS = ("global", "node")
FAILURE_MODES = ("fail", "wait")
EPS = 1e-9
SNAPSHOT_FIELDS = set(schedule.Snapshot.__dataclass_fields__)


@dataclass(frozen=True)
class Link:
    """One node's link to the source. Rates in MB/s (1 MB = 10**6 bytes), times in seconds."""
    mb_per_s: float
    jitter: float = 0.0                 # each transfer runs at its share times U[1 - jitter, 1 + jitter]
    outages: tuple = ()                 # ((start_s, seconds), ...): nothing moves, every try fails
    probe_latency_s: float = 0.05       # a HEAD; a GET waits as long for its first byte
    verify_s: float = 0.0               # after the last byte: footer check, fsync, rename
    retry_gap_s: float = 30.0           # after an outage a try comes up to this late (FetchPolicy.backoff_max)
    stall_s: float = 30.0               # a try without a byte gives up after this (FetchPolicy.stall_timeout)
    burst_s: float = 0.0                # a token bucket's credit: an idle link banks up to this many seconds
                                        # of bytes, sent at once when a transfer starts (ShardServer: 0.05;
                                        # empty at the start)

    def __post_init__(self):
        _positive("link.mb_per_s", self.mb_per_s)
        _number("link.burst_s", self.burst_s, 0)
        _number("link.stall_s", self.stall_s, 0)
        _number("link.jitter", self.jitter, 0, 1, hi_open=True)
        _number("link.probe_latency_s", self.probe_latency_s, 0)
        _number("link.verify_s", self.verify_s, 0)
        _number("link.retry_gap_s", self.retry_gap_s, 0)
        spans = []
        for o in self.outages:
            if not isinstance(o, (tuple, list)) or len(o) != 2:
                raise ConfigError(f"an outage is (start seconds, length seconds), got {o!r}")
            _number("outage start", o[0], 0)
            _positive("outage length", o[1])
            spans.append((float(o[0]), float(o[0]) + float(o[1])))
        merged = []
        for a, b in sorted(spans):              # overlapping outages are one outage
            if merged and a <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        object.__setattr__(self, "outages", tuple((a, b - a) for a, b in merged))


@dataclass(frozen=True)
class Scenario:
    """Everything a simulated run depends on. `sizes`: bytes of every shard of the dataset, the last one
    being the val shard (train shards 0..len-2). `window`: None for prefetch="auto" (the downloader's
    default), else a fixed buffer_size."""
    sizes: tuple
    consume_mb_per_s: float
    link: Link
    budget_bytes: int | None = None
    nodes: int = 1
    ranks_per_node: int = 1
    partition: str = "global"
    epochs: int = 1
    window: int | None = None
    buffer_size: int = 5                # the adaptive window's start (StreamingDownloader's buffer_size)
    workers: int = 2
    initial_buffer: int = 1
    retain: int = 0
    failure_mode: str = "fail"          # FailurePolicy.mode: "fail" raises after `deadline_s` of failed tries
    deadline_s: float = 300.0
    seed: int = 0
    read_overhead_s: float = 0.0        # each read takes size / rate plus this (the reader's own costs)
    prefetch: PrefetchPolicy = field(default_factory=PrefetchPolicy)

    def __post_init__(self):
        sizes = tuple(self.sizes)
        if len(sizes) < 2:
            raise ConfigError(f"a dataset needs at least one train shard and the val shard, got {len(sizes)} shards")
        for s in sizes:
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not s > 0 or not math.isfinite(s):
                raise ConfigError(f"shard sizes must be positive numbers of bytes, got {s!r}")
        object.__setattr__(self, "sizes", tuple(int(s) for s in sizes))
        _positive("consume_mb_per_s", self.consume_mb_per_s)
        if self.budget_bytes is not None:
            _positive("budget_bytes", self.budget_bytes)
            object.__setattr__(self, "budget_bytes", int(self.budget_bytes))
        for name, lo in (("nodes", 1), ("ranks_per_node", 1), ("epochs", 1), ("buffer_size", 1), ("workers", 1),
                         ("initial_buffer", 0), ("retain", 0)):
            _int(name, getattr(self, name), lo)
        if self.window is not None:
            _int("window", self.window, 1)
        if self.partition not in PARTITIONS:
            raise ConfigError(f"partition must be one of {', '.join(PARTITIONS)}, got {self.partition!r}")
        if self.partition == "node" and self.nodes > self.train_shards:
            raise ConfigError(f"partition='node' with {self.nodes} nodes needs at least {self.nodes} train shards, "
                              f"got {self.train_shards}")
        if self.failure_mode not in FAILURE_MODES:
            raise ConfigError(f"failure_mode must be one of {', '.join(FAILURE_MODES)}, got {self.failure_mode!r}")
        _number("deadline_s", self.deadline_s, 0)
        _number("read_overhead_s", self.read_overhead_s, 0)
        if self.initial_buffer > min(self.window or self.buffer_size, self.train_shards):
            raise ConfigError(f"initial_buffer={self.initial_buffer} is more than the window "
                              f"({self.window or self.buffer_size}) or the train shards ({self.train_shards})")
        if self.budget_bytes is not None:       # downloader._check_budget, on every node's first shard
            firsts = range(self.nodes) if self.partition == "node" else (0,)
            need = self.sizes[-1] + 2 * max(self.sizes[n] for n in firsts)
            if self.budget_bytes < need:
                raise ConfigError(f"a budget of {self.budget_bytes / MB:g} MB cannot hold the val shard "
                                  f"({self.sizes[-1] / MB:g} MB) plus two train shards: give at least "
                                  f"{need / MB:g} MB (the downloader refuses it too)")

    @classmethod
    def uniform(cls, shards, shard_mb, link_mb_per_s, consume_mb_per_s, budget_mb=None, link=None, **kw):
        """`shards` train shards plus the val shard, all of `shard_mb` MB."""
        _int("shards", shards, 1)
        _positive("shard_mb", shard_mb)
        link = link or Link(link_mb_per_s)
        return cls((round(shard_mb * MB),) * (shards + 1), consume_mb_per_s, link,
                   None if budget_mb is None else round(budget_mb * MB), **kw)

    @property
    def train_shards(self):
        return len(self.sizes) - 1

    @property
    def val_shard(self):
        return len(self.sizes) - 1

    def read_plan(self, node):
        if self.partition == "node":
            return ReadPlan.sequential(self.train_shards, epochs=self.epochs, node=node, nodes=self.nodes)
        return ReadPlan.sequential(self.train_shards, epochs=self.epochs)

    @property
    def pass_mb_per_s(self):
        """The MB/s of shard bytes one node's readers move through (K * R under partition="global")."""
        return self.consume_mb_per_s * (self.nodes if self.partition == "global" else 1)


@dataclass(frozen=True)
class NodeResult:
    node: int
    first_step_s: float             # creation to the reader holding its first shard
    wait_fraction: float            # blocked after that / wall after that
    wait_s: float
    waits: int                      # reads that waited
    wall_s: float                   # creation to the last release (or to the failure)
    peak_disk_bytes: int
    wire_bytes: int
    window_min: int
    window_max: int
    window_last: int
    downloads: int
    shards_read: int
    failed_at_s: float | None = None    # the failure policy raised in the reader at this time
    failure: str | None = None
    events: tuple = field(default=(), repr=False, compare=False)

    def to_json(self):
        return {k: getattr(self, k) for k in ("node", "first_step_s", "wait_fraction", "wait_s", "waits", "wall_s",
                                              "peak_disk_bytes", "wire_bytes", "window_min", "window_max",
                                              "window_last", "downloads", "shards_read", "failed_at_s", "failure")}


@dataclass(frozen=True)
class Result:
    scenario: Scenario
    nodes: tuple                    # NodeResult per node simulated (under "global" maybe a sample: see simulate)
    worst: NodeResult               # the most data-wait (a failure first), then the latest first step

    @property
    def sampled(self):
        """Whether fewer nodes were simulated than the scenario has (statistically alike ones left out)."""
        return len(self.nodes) < self.scenario.nodes

    @property
    def total_wire_bytes(self):
        """Bytes over every node's link (a sample's mean times the nodes, when sampled)."""
        if self.sampled:
            return round(sum(n.wire_bytes for n in self.nodes) / len(self.nodes) * self.scenario.nodes)
        return sum(n.wire_bytes for n in self.nodes)

    def to_json(self):
        out = self.worst.to_json()
        out.pop("node")
        out["worst_node"] = self.worst.node
        out["total_wire_bytes"] = self.total_wire_bytes
        out["nodes_total"] = self.scenario.nodes
        out["nodes_simulated"] = len(self.nodes) if self.sampled else self.scenario.nodes
        out["nodes"] = [n.to_json() for n in self.nodes]
        return out


def simulate(scenario, record_events=False, sample_nodes=8):
    """Simulate the nodes of scenario (a Result). record_events: keep the worst node's event dicts (the
    downloader's events.jsonl records, on the simulated clock) in its NodeResult.events.

    Under partition="global" every node runs the same plan on a link like the others: with nothing random
    (no jitter, no outage) one node is simulated for all; else the first `sample_nodes` nodes are (each one
    more draw of the same process; None: all of them). Under partition="node" every node is simulated."""
    k = scenario.nodes
    if scenario.partition == "global" and not scenario.link.jitter and not scenario.link.outages:
        one = simulate_node(scenario, 0, record_events)
        nodes = tuple(replace(one, node=n, events=one.events if n == 0 else ()) for n in range(k))
    else:
        if scenario.partition == "global" and sample_nodes is not None:
            _int("sample_nodes", sample_nodes, 1)
            k = min(k, sample_nodes)
        nodes = tuple(simulate_node(scenario, n) for n in range(k))
    worst = max(nodes, key=lambda r: (r.failed_at_s is not None, r.wait_fraction, r.first_step_s, -r.node))
    if record_events and not worst.events:
        worst = simulate_node(scenario, worst.node, True)
        nodes = tuple(worst if n.node == worst.node else n for n in nodes)
    return Result(scenario, nodes, worst)


def simulate_node(scenario, node=0, record_events=False):
    """One node's downloader and readers (a NodeResult)."""
    return _Node(scenario, node, record_events).run()


# -----------------------------------------------------------------------------

class _Transfer:
    __slots__ = ("shard", "size", "rem", "got", "reported", "ready_at", "version", "g", "began", "rate", "body_s")

    def __init__(self, shard, size, began, ready_at, g):
        self.shard, self.size, self.rem, self.got, self.reported = shard, size, float(size), 0.0, 0.0
        self.began, self.ready_at, self.version, self.g, self.rate = began, ready_at, 0, g, 0.0
        self.body_s = None              # seconds from its start to its last byte (what download_done gets)


class _Node:
    """The state downloader.py keeps, under the same names where it has one, and the simulated world."""

    def __init__(self, sc, node, record):
        self.sc, self.node, self.record = sc, node, record
        self.rng = random.Random(f"{sc.seed}:{node}")
        self.plan = sc.read_plan(node)
        self.val = sc.val_shard
        self.length = self.plan.length
        self.read_bps = sc.pass_mb_per_s * MB
        self.link_bps = sc.link.mb_per_s * MB
        self.burst = sc.link.burst_s * self.link_bps
        self.credit = 0.0               # the bucket starts empty (ShardServer.set_rate empties it)
        self.lat = sc.link.probe_latency_s
        self.readers = tuple(range(sc.ranks_per_node))
        self.budget = sc.budget_bytes
        # --- the downloader's state
        self.files = {}                 # shard -> bytes (verified)
        self.files_total = 0
        self.inflight = {}              # shard -> _Transfer (begin to verified)
        self.reserved = 0               # bytes reserved by in-flight transfers
        self.leases = Counter()         # shard -> leases held
        self.leased = set()
        self.consumed = {}              # shard -> None, oldest first
        self.sizes = {}
        self.probing = set()
        self.blocked = {}
        self.demand = Counter()
        self.demand_order = {}
        self.cursor = {}
        self.last_read = {}
        self.verified = 0
        self.initial = ()
        self.init_wait = None           # start()'s initial buffer still to come, in order
        self.start_pos = 0 if sc.initial_buffer > 0 else None
        self.max_shard_bytes = 0
        self.transferring = set()       # in flight and holding the link (downloader._transferring)
        # schedule.Snapshot.transferring, where this schedule.py has it (slots count transfers on the link)
        self._link_field = {"transferring": self.transferring} if "transferring" in SNAPSHOT_FIELDS else {}
        self.ctl = PrefetchController(sc.prefetch, start_ahead=sc.buffer_size) if sc.window is None else None
        self.win = sc.window or sc.buffer_size
        self.win_base = None
        self.windows = [self.win]
        self.threads = sc.workers + 1
        # --- the world
        self.now = 0.0
        self.heap, self.seq = [], 0
        self.up = True
        self.outage_end = None
        self.troubled = set()           # shards whose transfer met an outage (tries failed)
        self.events = []
        self.peak = 0
        self.wire = 0.0
        self.downloads = 0
        self.pos = None                 # the readers' plan position
        self.waiting = None             # (ask time, readers still waiting) while the readers wait
        self.ask_id = 0
        self.first = None
        self.waited = 0.0
        self.waits = 0
        self.reads = 0
        self.failed = None
        self.done_at = None

    # --- the clock
    def _push(self, t, kind, *args):
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, args))

    def _advance(self, t):
        dt = t - self.now
        if dt > 0:
            busy = False
            for x in self.inflight.values():
                if x.rate:
                    busy = True
                    d = min(x.rem, x.rate * dt)
                    x.rem -= d
                    x.got += d
                    self.wire += d
            if not busy and self.up and self.burst:     # the idle link banks credit, up to the burst
                self.credit = min(self.burst, self.credit + self.link_bps * dt)
        self.now = t
        disk = self.files_total + sum(x.got for x in self.inflight.values())
        if disk > self.peak:
            self.peak = disk

    def _rates(self):
        """Give every transfer moving bytes its fair share of the link; return the next body completion."""
        moving = [x for x in self.inflight.values() if x.rem > 0 and x.ready_at <= self.now + EPS and self.up]
        t_next = math.inf
        for x in self.inflight.values():
            x.rate = 0.0
        if moving:
            share = self.link_bps / len(moving)
            for x in moving:
                if self.credit > 0:             # banked credit goes at once
                    d = min(self.credit, x.rem)
                    x.rem -= d
                    x.got += d
                    self.wire += d
                    self.credit -= d
                x.rate = share * x.g
                t_next = min(t_next, self.now + x.rem / x.rate)
        return t_next

    def run(self):
        sc = self.sc
        for k, (a, length) in enumerate(sc.link.outages):
            self._push(a, "outage_start", k)
            self._push(a + length, "outage_end", k)
        self._start()
        while self.done_at is None and self.failed is None:
            t_body = self._rates()
            t_heap = self.heap[0][0] if self.heap else math.inf
            if t_body == math.inf and t_heap == math.inf:
                self._fail(self.now, "the simulation stalled: nothing in flight and nothing to start "
                                     f"(shard {self.plan.at(self.pos) if self.pos is not None else None} never came)")
                break
            if t_body <= t_heap:
                self._advance(t_body)
                for x in list(self.inflight.values()):
                    if x.rate and x.rem <= max(EPS, 1e-9 * x.size):
                        self.wire += x.rem
                        x.got, x.rem, x.rate = float(x.size), 0.0, 0.0
                        x.body_s = self.now - x.began
                        self._link(x.shard, False)      # its bytes are in: it verifies off the link
                        if sc.link.verify_s > 0:
                            self._push(self.now + sc.link.verify_s, "verified", x.shard)
                        else:
                            self._verified(x.shard)
                continue
            t, _, kind, args = heapq.heappop(self.heap)
            self._advance(t)
            getattr(self, "_on_" + kind)(*args)
        return self._result()

    # --- start()
    def _start(self):
        self._event("start", total_shards=self.plan.epoch_length, buffer_size=self.sc.buffer_size,
                    retain=self.sc.retain, val_shard=self.val)
        t = 0.0
        if self.budget is not None:             # _check_budget: HEADs of the first shard and the val shard
            for s in (self.plan.at(0), self.val):
                t += self.lat
                self._note_info(s)
        self.now = t
        self.initial = tuple(self.plan.ahead(-1, self.sc.initial_buffer))
        self._update_window()
        if self.initial:
            self.init_wait = list(self.initial)
            self._initial_step()
        else:
            self._ask(0)
        self._dispatch()

    def _initial_step(self):
        """start()'s _initial_buffer: wait for each target in turn (demand, no reader); then the reader asks."""
        while self.init_wait and self.init_wait[0] in self.files:
            self.init_wait.pop(0)
        if self.init_wait:
            s = self.init_wait[0]
            self.demand[s] += 1
            self.demand_order.setdefault(s, self.now)
            return
        self.initial = ()
        self.init_wait = None
        self._ask(0)

    # --- the readers' side
    def _ask(self, pos):
        """Every rank asks for the shard at plan position pos (wait_for_shard, rank after rank)."""
        self.pos = pos
        shard = self.plan.at(pos)
        waiting = []
        for r in self.readers:
            self._move_reader(r, pos)
            if shard in self.files:
                self._hand_over(shard, r, False)
                continue
            if self.ctl is not None:
                self.ctl.on_wait()
                self._update_window()
            self.demand[shard] += 1
            self.demand_order.setdefault(shard, self.now)
            self._event("wait_start", shard, reader=r)
            waiting.append(r)
        if waiting:
            self.ask_id += 1
            self.waiting = (self.now, waiting)
            self.waits += self.first is not None
            self._push(self.now + self.sc.deadline_s, "deadline", self.ask_id)
        else:
            self._reading()

    def _reading(self):
        """Every rank holds the shard: it is read for size / rate seconds."""
        if self.first is None:
            self.first = self.now
        self.reads += 1
        shard = self.plan.at(self.pos)
        self._push(self.now + self.sc.sizes[shard] / self.read_bps + self.sc.read_overhead_s, "read_end", self.pos)

    def _move_reader(self, r, pos):
        last = self.last_read.get(r)
        if self.ctl is not None and last is not None and pos == last[0] + 1:
            self.ctl.meter.read_done(last[2], self.now - last[1])
        self.cursor[r] = pos
        self._evict_routine(keep=self.plan.at(pos))

    def _hand_over(self, shard, r, waited):
        self.leases[shard] += 1
        self.leased.add(shard)
        self.consumed.pop(shard, None)
        self.last_read[r] = (self.cursor[r], self.now, self.files[shard])
        if self.ctl is not None:
            self.ctl.on_read(waited)
            self._update_window()

    def _on_read_end(self, pos):
        shard = self.plan.at(pos)
        for _ in self.readers:                  # release, rank after rank
            self.leases[shard] -= 1
            if self.leases[shard] == 0:
                del self.leases[shard]
                self.leased.discard(shard)
                self.consumed[shard] = None
                self._event("consumed", shard)
            self._evict_routine()
        if pos + 1 >= self.length:
            self.done_at = self.now
            return
        self._ask(pos + 1)
        self._dispatch()

    def _shard_ready(self, shard):
        """A verified shard: the readers waiting for it (or start()) get it."""
        if self.init_wait is not None:
            if self.init_wait and self.init_wait[0] == shard:
                self._undemand(shard)
                self._initial_step()
            return
        if self.waiting is None or self.plan.at(self.pos) != shard:
            return
        t0, readers = self.waiting
        self.waiting = None
        for r in readers:
            self._undemand(shard)
            self._event("wait_end", shard, reader=r, seconds=round(self.now - t0, 4), ok=True)
            self._hand_over(shard, r, True)
        if self.first is not None:
            self.waited += self.now - t0
        self._reading()

    def _undemand(self, shard):
        self.demand[shard] -= 1
        if self.demand[shard] <= 0:
            del self.demand[shard]
            self.demand_order.pop(shard, None)

    def _on_deadline(self, ask_id):
        """FailurePolicy: a reader that waited deadline_s for a shard whose tries fail gets the error."""
        if self.waiting is None or ask_id != self.ask_id or self.sc.failure_mode != "fail":
            return
        shard = self.plan.at(self.pos)
        if shard in self.troubled:
            self._fail(self.now, f"shard {shard} failed for {self.sc.deadline_s:g} s (an outage): the failure "
                                 f"policy 'fail' raises in the reader (use 'wait' to ride it out)")
        elif shard in self.blocked and not self.inflight:
            self._fail(self.now, f"shard {shard} waited {self.sc.deadline_s:g} s for room in the budget")

    def _fail(self, t, why):
        self.failed = (t, why)
        self._event("failed", self.plan.at(self.pos) if self.pos is not None else None, error=why)

    # --- the window (downloader._snapshot, _update_window, _evict_routine)
    def _snapshot(self):
        snap = schedule.Snapshot(
            plan=self.plan, val_shard=self.val, cursors=self.cursor, start_pos=self.start_pos,
            initial=self.initial, initial_buffer=self.sc.initial_buffer, window=self.win,
            window_base=self.win_base, adaptive=self.ctl is not None, verified=self.verified,
            files=self.files, partials={}, inflight=self.inflight.keys(), leased=self.leased, **self._link_field,
            consumed=tuple(self.consumed), demand=tuple(sorted(self.demand, key=lambda s: self.demand_order.get(s, 0))),
            sizes=self.sizes, probing=self.probing, failures={}, troubled={}, skipped=frozenset(),
            blocked=self.blocked.keys(), budget=self.budget, used_bytes=self.files_total + self.reserved,
            retain=self.sc.retain, parallel=self.sc.workers, max_shard_bytes=self.max_shard_bytes)
        if self.ctl is None:
            return snap
        # downloader._snapshot: the adaptive limit, the same pure rule (the controller caches its rates)
        return replace(snap, parallel=schedule.transfer_limit(snap, self.ctl.rates(), self.sc.workers))

    def _update_window(self):
        if self.ctl is None:
            return
        w = self.ctl.window(schedule.window_room(self._snapshot()))
        self.win_base = w.base
        if w.size != self.win:
            self.win = w.size
            self.windows.append(w.size)
            self._event("window", size=w.size, base=w.base, bump=w.bump, room=w.room, reason=w.reason)

    def _evict_routine(self, keep=None):
        if not self.consumed:                   # routine_evictions deletes only consumed shards
            return
        for e in schedule.routine_evictions(self._snapshot(), keep):
            self._delete(e.shard, e.why)

    def _delete(self, shard, why):
        freed = self.files.pop(shard)
        self.files_total -= freed
        self.consumed.pop(shard, None)
        self._event("evicted", shard, reason=why, freed=freed)

    def _note_info(self, shard):
        size = self.sc.sizes[shard]
        self.sizes[shard] = size
        if shard in self.plan and size > self.max_shard_bytes:
            self.max_shard_bytes = size
            self._update_window()

    # --- the workers (downloader._next_job, _pick, _make_room)
    def _dispatch(self):
        while self.threads - len(self.inflight) - len(self.probing) > 0 and self.failed is None:
            snap = self._snapshot()
            action = schedule.next_action(snap, self.now)
            if action is None:
                return
            s = action.shard
            if action.kind is schedule.JobKind.PROBE:
                self.probing.add(s)
                t = self._after_outage(self.now + self.lat)
                if t > self.now + self.lat:
                    self.troubled.add(s)        # its HEADs fail: a failure the policy counts
                self._push(t, "probed", s)
                continue
            size = schedule.fetch_size(snap, s)
            evict, _ = schedule.make_room(snap, s, size)
            if evict is None:
                if s in self.blocked:
                    return              # still no room: the next change looks again
                self.blocked[s] = True  # priority() may put another shard first now
                continue
            for e in evict:
                self._delete(e.shard, e.why)
            self.blocked.pop(s, None)
            self._begin(s, size)

    def _after_outage(self, t):
        """When a request sent at t gets through: after the outage it meets, plus the retry's gap."""
        for a, length in self.sc.link.outages:
            if a <= t < a + length:
                return a + length + self.rng.uniform(0, self.sc.link.retry_gap_s)
        return t

    def _begin(self, s, size):
        g = 1.0 + (self.rng.uniform(-self.sc.link.jitter, self.sc.link.jitter) if self.sc.link.jitter else 0.0)
        x = _Transfer(s, size, self.now, self.now + self.lat, g)
        self.inflight[s] = x
        self.reserved += size
        if self.up:
            self._link(s, True)
            self._push(x.ready_at, "ready", s, x.version)
        else:
            self.troubled.add(s)
            x.ready_at = math.inf               # its tries fail until the outage is over, off the link
        self._event("download_start", s, size=size)

    def _link(self, s, busy):
        """downloader._link: a transfer starts or stops holding the link (its try receives, or its bytes
        are in, or the try failed). The meter hears the bytes that landed before the count changes."""
        if busy == (s in self.transferring):
            return
        if self.ctl is not None:
            self._flush_bytes()
            (self.ctl.meter.transfer_started if busy else self.ctl.meter.transfer_ended)(self.now)
        (self.transferring.add if busy else self.transferring.discard)(s)

    def _flush_bytes(self):
        """on_bytes: tell the meter what landed so far, for every transfer."""
        m = self.ctl.meter
        for y in self.inflight.values():
            if y.got > y.reported:
                m.add_bytes(y.got - y.reported)
                y.reported = y.got

    def _on_ready(self, s, version):
        x = self.inflight.get(s)
        if x is not None and x.version == version and x.rem > 0:
            self._link(s, True)                 # _rates() lets it move now

    def _on_probed(self, s):
        if not self.up:                         # the HEAD fails until the outage is over
            self.troubled.add(s)
            self._push(self._after_outage(self.now), "probed", s)
            return
        self.probing.discard(s)
        self._note_info(s)
        self._dispatch()

    def _verified(self, s):
        x = self.inflight.pop(s)
        self.reserved -= x.size
        self.files[s] = x.size
        self.files_total += x.size
        self.consumed.pop(s, None)
        self.troubled.discard(s)
        self.downloads += 1
        self._link(s, False)
        if self.ctl is not None:
            if x.got > x.reported:
                self.ctl.meter.add_bytes(x.got - x.reported)
                x.reported = x.got
            self.ctl.meter.download_done(x.size, x.body_s if x.body_s is not None else self.now - x.began,
                                         self.now)
            self._update_window()
        if s in self.plan:
            self.verified += 1
        self._event("downloaded", s, size=x.size, seconds=round(self.now - x.began, 4))
        self._evict_routine()
        self._shard_ready(s)
        self._dispatch()

    def _on_verified(self, s):
        self._verified(s)

    # --- outages
    def _on_outage_start(self, k):
        self.up = False
        self.outage_end = sum(self.sc.link.outages[k])
        for x in self.inflight.values():
            if x.rem > 0:
                self.troubled.add(x.shard)
        self._push(min(self.now + self.sc.link.stall_s, self.outage_end), "stalled", k)
        self._event("outage_start", seconds=self.sc.link.outages[k][1])
        if self.waiting is not None and self.now - self.waiting[0] >= self.sc.deadline_s:
            self._on_deadline(self.ask_id)

    def _on_stalled(self, k):
        """FetchPolicy.stall_timeout after the outage began, the stalled tries give up: off the link (their
        retries fail at once until it is over)."""
        if self.up or self.outage_end != sum(self.sc.link.outages[k]):
            return                              # that outage is over already
        for x in list(self.inflight.values()):
            if x.rem > 0 and x.shard in self.troubled:
                x.version += 1
                x.ready_at = math.inf
                self._link(x.shard, False)
        self._dispatch()

    def _on_outage_end(self, k):
        self.up = True
        self.outage_end = None
        for x in self.inflight.values():
            if x.rem > 0 and x.shard in self.troubled:
                x.version += 1
                x.ready_at = max(x.ready_at if x.ready_at < math.inf else 0.0,
                                 self.now + self.rng.uniform(0, self.sc.link.retry_gap_s))
                self._push(x.ready_at, "ready", x.shard, x.version)
        self._event("outage_end")

    # --- the event log (downloader._event) and the result
    def _event(self, event, shard=None, **extra):
        if not self.record:
            return
        snap = self._snapshot()
        win = schedule.ahead(snap)
        self.events.append({"t": round(self.now, 6), "event": event, "shard": shard,
                            "bytes_on_disk": int(self.files_total + sum(x.got for x in self.inflight.values())),
                            "budget": self.budget, "ahead": sum(1 for s in win if s in self.files),
                            "reader_shard": schedule.reader_shard(snap), "window": self.win, **extra})

    def _result(self):
        end = self.done_at if self.done_at is not None else self.failed[0] if self.failed else self.now
        if self.failed and self.waiting is not None and self.first is not None:
            self.waited += end - self.waiting[0]            # the wait the failure ended
        first = self.first if self.first is not None else end
        after = end - first
        return NodeResult(
            node=self.node, first_step_s=first, wait_fraction=(self.waited / after) if after > 0 else 0.0,
            wait_s=self.waited, waits=self.waits, wall_s=end, peak_disk_bytes=int(round(self.peak)),
            wire_bytes=int(round(self.wire)), window_min=min(self.windows), window_max=max(self.windows),
            window_last=self.win, downloads=self.downloads, shards_read=self.reads,
            failed_at_s=self.failed[0] if self.failed else None, failure=self.failed[1] if self.failed else None,
            events=tuple(self.events))


def download_everything_first(sizes, link, workers=4):
    """Seconds until `workers` threads fetching every shard in order (download_shards: a HEAD, then a GET,
    over the shared link) have all of them verified: nanochat's download-first start, the baseline."""
    bps, lat = link.mb_per_s * MB, link.probe_latency_s
    queue = list(sizes)
    now, jobs = 0.0, []                 # [bytes left, ready at (the latency's end), done at (verified)]
    while queue or jobs:
        while queue and len(jobs) < workers:
            jobs.append([float(queue.pop(0)), now + 2 * lat, None])
        moving = [j for j in jobs if j[2] is None and j[1] <= now + EPS]
        t_next = min([j[1] for j in jobs if j[2] is None and j[1] > now + EPS]
                     + [j[2] for j in jobs if j[2] is not None], default=math.inf)
        rate = bps / len(moving) if moving else 0.0
        if moving:
            t_next = min(t_next, now + min(j[0] for j in moving) / rate)
        for j in moving:
            j[0] -= rate * (t_next - now)
            if j[0] <= 1e-6:
                j[2] = t_next + link.verify_s
        now = t_next
        jobs = [j for j in jobs if j[2] is None or j[2] > now + EPS]
    return now


# -----------------------------------------------------------------------------
# checks

def _number(name, v, lo, hi=None, hi_open=False):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < lo \
            or (hi is not None and (v >= hi if hi_open else v > hi)):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}{')' if hi_open else ']'}"
        raise ConfigError(f"{name} must be a number {rng}, got {v!r}")


def _positive(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not v > 0:
        raise ConfigError(f"{name} must be a number > 0, got {v!r}")


def _int(name, v, lo):
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ConfigError(f"{name} must be an int >= {lo}, got {v!r}")
