"""The loader's DDP state: rank 0's loader state carries every rank's, so resuming needs only rank 0's.

nanochat saves rank 0's loader state alone and hands it to every rank on resume. Under torchrun the train
loader (loader.py) wraps its generator in `LoaderSync.wrap`: every other rank publishes its per-batch state
to the job's store (torchrun.py), and rank 0's state for batch k carries every rank's state for batch k, so
each rank resumes bitwise where it was. Given a state made at another world size it resumes elastically:
no row group of the interrupted epoch is read twice or skipped (docs/DISTRIBUTED.md says what is exact and
what is not). Nothing here touches shards or downloaders.
"""
import logging
import time

from .errors import StateMismatchError
from .settings import torchrun_env
from .torchrun import DEFAULT_TIMEOUT, POLL_MAX, POLL_MIN, node_info, open_store

logger = logging.getLogger(__name__)
P = "[shardstream.distributed]"

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
    def for_loader(cls, split, rank, world, fingerprint, resume_state_dict, share_state=True, timeout=None):
        """None unless this train loader runs under torchrun (world > 1) or resumes from a DDP state.
        share_state: put every rank's cursor in rank 0's state (the edges pass SHARDSTREAM_SHARE_STATE);
        timeout: seconds a silent rank is waited for (None: DEFAULT_TIMEOUT)."""
        if split != "train":
            return None
        info = node_info()
        share = info.world_size > 1 and bool(torchrun_env().get("MASTER_ADDR")) and share_state
        has_ddp = isinstance(resume_state_dict, dict) and isinstance(resume_state_dict.get("ddp"), dict)
        if not share and not has_ddp:
            return None
        state, rows_read, batch, layers = resume_state_dict, None, 0, []
        if has_ddp:
            state, batch, layers = cls._own_state(resume_state_dict, info, rank, world, fingerprint)
            rows_read = _rows_read_fn(layers) if layers else None
        sync = cls(info, rank, world, state, rows_read, batch, layers, share,
                   DEFAULT_TIMEOUT if timeout is None else float(timeout))
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
