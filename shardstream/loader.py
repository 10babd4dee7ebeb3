"""The loader: shards -> documents -> tokens -> BOS-aligned best-fit rows, with an exact-resume state_dict.

A drop-in for nanochat's dataloader (shared/DESIGN.md §1): same names, signatures and yields,

    loader = tokenizing_distributed_data_loader_with_state_bos_bestfit(tokenizer, B, T, "train",
                                                                       streaming_downloader=dl)
    inputs, targets, state_dict = next(loader)      # int64 (B, T) on `device`, forever

plus a `streaming_downloader=` keyword (wait for each shard, hold it while reading, release it after) and
`data_dir=` for a plain local directory of shards (nanochat's layout; default shards.default_data_dir()).
Documents are the string column `text_column` (the downloader's, else the `text_column=` keyword, "text"
by default); no other column is ever decoded, and the first shard opened must have it (a ConfigError
naming the file and its columns otherwise). A downloader over any parquet corpus (a manifest) has
several val shards or none: the val split reads them all in order, and with none (--val-files none)
building a val loader is a ConfigError.
Called with neither and SHARDSTREAM_STREAMING=1, it streams with a downloader configured by the
environment that the generator owns (streaming_env.py; docs/NANOCHAT.md: nanochat changes one import).

What it keeps from nanochat: split "train" = every shard but the last, "val" = the last; infinite epochs
(`epoch` counts from 1); rank r of W reads row groups r, r+W, ... of every shard; documents tokenized in
batches of tokenizer_batch_size with tokenizer.encode(texts, prepend=bos, num_threads=tokenizer_threads);
best-fit packing with a buffer of at least buffer_size documents refilled before every placement (largest
buffered doc that fits the rest of the row, the oldest among equals; when none fits, the shortest, oldest
among equals, cropped to fill the row). The rows are exactly those of nanochat's algorithm.

What it does better:
- Speed. Reading and tokenizing run in the background while the packer works, with two
  tokenizer.encode calls in flight so the tokenizer's threads do not idle between calls (results are
  handed over in stream order, so the stream is deterministic); the packer keeps documents in buckets by
  length (bisect over the distinct lengths instead of a scan of the buffer) and assembles rows with numpy
  slice copies. With our Tokenizer the ids come as numpy arrays straight from tiktoken's buffer
  (Tokenizer.encode_arrays: no Python int per token, BOS written by the packer), so the loader can
  outrun raw tokenizer.encode; a tokenizer with nanochat's interface only gives lists, converted only
  where the packer copies them (cropped tokens never are). Row groups are read without Arrow's thread
  pool (its hand-offs cost the tokenizer CPU on small machines). Each buffered document is its own
  sequence, so memory is the buffer's, no more.
- Exact resume. The state yielded with batch k describes the position at the START of batch k, so
  resuming from it yields batch k again, then k+1, ... bitwise identical (nanochat's training loop saves
  the state of the batch it holds but has not trained on). The packer's behaviour depends only on the
  documents in its buffer and the stream cursor, so the state records, every `state_every` batches, an
  "anchor": the cursor (epoch, shard index, row group, row) and the buffered documents as (row group,
  bitmask of rows) entries; batch states in between say how many batches to replay from the anchor.
  Resuming re-reads the anchor's documents (the downloader fetches evicted shards again), re-tokenizes
  them, and replays at most state_every - 1 batches. The state is small JSON (a few KB at buffer 1000),
  carries a version, the rank, and a fingerprint (split, source, shard count, B, T, world size, tokenizer
  identity, buffer_size, tokenizer_batch_size); a mismatch raises StateMismatchError naming the field. It also
  keeps nanochat's keys pq_idx, rg_idx, epoch (the row group last read), and a plain nanochat state
  {pq_idx, rg_idx, epoch} resumes the way nanochat does (next row-group stride, empty buffer: approximate).
- A state made by another rank (nanochat hands rank 0's state to every rank) cannot restore this rank's
  buffer by itself: under torch.distributed, loadersync.LoaderSync makes rank 0's state carry every
  rank's, so each rank resumes exactly; without it, the rank resumes approximately from the nanochat keys,
  with a warning.
"""
import bisect
import hashlib
import logging
import os
import queue
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .errors import ConfigError, CorruptShardError, ShardSkipped, StateMismatchError
from .reader import ShardReader
from .settings import torchrun_env
from .shards import default_data_dir, list_shards, shard_name
from .verify import TEXT_COLUMN, check_row_group, decoded_too_big, row_group_limits

logger = logging.getLogger(__name__)

STATE_VERSION = 1
STATE_EVERY = 16        # batches between anchors: resuming replays at most STATE_EVERY - 1 batches
PREFETCH_CHUNKS = 16    # tokenized document batches the background thread may run ahead
ENCODE_CALLS_IN_FLIGHT = 2  # tokenizer.encode calls overlapped (results still handed over in order)


# -----------------------------------------------------------------------------------------------------
# Who am I: DDP rank and world size

def get_dist_info(rank=None, world_size=None):
    """(rank, world_size): explicit arguments, else torch.distributed, else RANK/WORLD_SIZE env, else 0/1."""
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            r, w = torch.distributed.get_rank(), torch.distributed.get_world_size()
        elif int(torchrun_env().get("RANK", -1)) != -1:
            r, w = int(torchrun_env()["RANK"]), int(torchrun_env().get("WORLD_SIZE", 1))
        else:
            r, w = 0, 1
        rank = r if rank is None else rank
        world_size = w if world_size is None else world_size
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        raise ConfigError(f"bad DDP rank/world size {rank}/{world_size}: need 0 <= rank < world_size")
    return rank, world_size


# -----------------------------------------------------------------------------------------------------
# Which shards a split reads, and how a shard gets onto disk

class ShardPlan:
    """The split's shard list (index pq_idx -> shard id) and access to each shard's file.

    With a downloader (a reader.ShardReader: nothing else is asked of it): train = the downloader's read
    order (`plan.order`), val = its val shards, in order; acquire() waits for the verified file and leases
    it, release() hands it back. Without: the shard files of a local directory, train = all but the last,
    val = the last (nanochat's rule). `text_column`: the column documents are read from (the downloader's;
    without one, the argument); `open(path)` checks it on the first shard opened.
    """

    def __init__(self, split, downloader: ShardReader | None = None, data_dir=None, text_column=None):
        if split not in ("train", "val"):
            raise ConfigError(f"split must be 'train' or 'val', got {split!r}")
        self.split = split
        self.downloader = downloader
        self._checked = False
        if downloader is not None:
            self.text_column = downloader.text_column
            if text_column is not None and text_column != self.text_column:
                raise ConfigError(f"text_column={text_column!r} but the downloader reads column "
                                  f"{self.text_column!r}: give the column to the downloader (text_column=, "
                                  f"--text-column NAME), not to the loader")
            if split == "train":
                ids = list(downloader.plan.order)
            else:
                ids = list(downloader.val_shards)
                if not ids:
                    raise ConfigError(f"the source {downloader.source.identity()['source']} has no val files "
                                      f"(--val-files none): "
                                      f"there is no val split to load; skip the val loss, or pick val files "
                                      f"with --val-files GLOB")
            self.stride = downloader.row_group_stride(split)    # (rank, world), or None: the DDP rank and world
            self.source = downloader.source.identity()["source"]
            self.data_dir = None
        else:
            self.text_column = TEXT_COLUMN if text_column is None else text_column
            self.data_dir = os.fspath(data_dir if data_dir is not None else default_data_dir())
            if not os.path.isdir(self.data_dir):
                raise ConfigError(f"data dir {self.data_dir} does not exist: download shards there first "
                                  f"(shardstream download) or pass data_dir= / streaming_downloader=")
            found = list_shards(self.data_dir)
            if len(found) < 2:
                raise ConfigError(f"data dir {self.data_dir} holds {len(found)} shard file(s): need at least 2 "
                                  f"(train shards + the val shard, which is the last)")
            ids = found[:-1] if split == "train" else found[-1:]
            self.source = "local"
            self.stride = None
        if not ids:
            raise ConfigError(f"split {split!r} has no shards")
        self.shard_ids = ids
        self.rows_read = None       # loadersync.py, after an elastic resume: (epoch, pq_idx, rg_idx) -> rows read

    def __len__(self):
        return len(self.shard_ids)

    def acquire(self, pq_idx, quiet=False):
        """The shard's local path (waiting for the downloader); logs "Reading shard_XXXXX.parquet"."""
        shard_id = self.shard_ids[pq_idx]
        if self.downloader is not None:
            path = self.downloader.wait_for_shard(shard_id)
        else:
            path = os.path.join(self.data_dir, shard_name(shard_id))
        # the val split re-reads its one shard at every wrap and every evaluation builds a new val loader:
        # at INFO that line would repeat through the trainer's output, so val reads log at DEBUG
        # named by its file on disk: shard_XXXXX.parquet, or a manifest's cache name (the downloader's log
        # names its source path beside it)
        (logger.debug if quiet or self.split == "val" else logger.info)("Reading %s", os.path.basename(path))
        return path

    def open(self, path):
        """The shard's ParquetFile; the first one opened must hold the text column as strings."""
        pf = _open_parquet(path)
        if not self._checked:
            check_text_column(pf, path, self.text_column)
            self._checked = True
        return pf

    def release(self, pq_idx, consumed=True):
        """Hand the shard back; consumed=False when it was not read to its end (a stop mid-shard, a
        resume's re-read of buffered documents), so the downloader keeps it for the read to come."""
        if self.downloader is not None:
            self.downloader.release(self.shard_ids[pq_idx], consumed=consumed)


PARQUET_ERRORS = (pa.ArrowException, OSError, ValueError, KeyError)
READ_BATCH_ROWS = 64    # documents decoded per step of a row group read; the decoded-size cap is checked between steps


def _open_parquet(path):
    try:
        return pq.ParquetFile(path)
    except PARQUET_ERRORS as e:
        raise _corrupt(path, "cannot be opened", e) from None


def check_text_column(pf, path, column):
    """ConfigError unless the ParquetFile pf (of path) has a string column named `column`: naming the file,
    its columns, and the flag that picks another."""
    try:
        schema = pf.schema_arrow
    except PARQUET_ERRORS as e:
        raise _corrupt(path, "has no readable schema", e) from None
    cols = ", ".join(f"{f.name} ({f.type})" for f in schema) or "none"
    if column not in schema.names:
        raise ConfigError(f"{path} has no column {column!r} to read documents from (its columns: {cols}): name "
                          f"the text column with --text-column NAME (text_column=)")
    typ = schema.field(column).type
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
        raise ConfigError(f"{path}: column {column!r} is {typ}, not a string column (its columns: {cols}): name "
                          f"the text column with --text-column NAME (text_column=)")


def _read_texts(pf, rg_idx, path=None, column=TEXT_COLUMN):
    """The row group's `column` values (the text) as a list of str, refusing a decompression bomb (verify.py's limits):
    first from the footer pyarrow already parsed (rows, declared uncompressed bytes), then while decoding,
    READ_BATCH_ROWS documents at a time, since a footer can lie and a dictionary page expands to more than
    it declares. What a bomb can make us hold is the cap plus one step's documents, not the row group."""
    limits = row_group_limits()         # outside the try: a bad setting is a ConfigError, not a corrupt shard
    try:
        declared = check_row_group(path, pf.metadata, rg_idx, limits, column=column)
        texts, decoded = [], 0
        # use_threads=False: one column of one row group gains nothing from Arrow's thread pool, whose
        # hand-offs cost CPU that the tokenizer's threads need. Steps of 64 documents cost no more than one
        # read_row_group (measured on nanochat-like row groups of 1,024 documents, ~3.5 MB)
        for batch in pf.iter_batches(batch_size=READ_BATCH_ROWS, row_groups=[rg_idx], columns=[column],
                                     use_threads=False):
            col = batch.column(0)
            decoded += col.nbytes
            if decoded > limits.max_bytes:
                raise decoded_too_big(path, rg_idx, decoded, limits, declared)
            texts.extend(col.to_pylist())
        return texts
    except (*PARQUET_ERRORS, IndexError) as e:     # IndexError: no such row group in the footer
        raise _corrupt(path, f"row group {rg_idx} cannot be read", e) from None


def _corrupt(path, what, e):
    """A shard pyarrow cannot read (its footer passed verification, a data page did not): a clear error."""
    return CorruptShardError(f"{path}: {what} ({type(e).__name__}: {e}): the shard is corrupt; delete it to have "
                             f"it fetched again, and if that does not help the source's file is broken")


# -----------------------------------------------------------------------------------------------------
# The document stream: tokenized batches ("chunks") in a deterministic order

class Chunk:
    """Up to tokenizer_batch_size documents of one row group, tokenized, one sequence per doc.

    Either `bos` is set and each doc is a numpy array of its ids without the BOS (which the packer writes
    itself: no copy to prepend it), or `bos` is None and each doc is the tokenizer's list, BOS first
    (converted only where the packer copies it into a row, so cropped tokens are never converted).
    A doc is dropped (set to None) when the packer takes it, so a long-lived doc in the buffer keeps only
    itself alive, not its whole batch."""
    __slots__ = ("pos", "next_pos", "docs", "bos")

    def __init__(self, pos, next_pos, docs, bos=None):
        self.pos = pos              # (epoch, pq_idx, rg_idx, first row)
        self.next_pos = next_pos    # where the stream continues after this chunk
        self.docs = docs            # list of sequences (None where not present / already taken)
        self.bos = bos              # the BOS id the docs lack, or None when they start with it


def tokenize_chunk(tokenizer, texts, bos, threads, pos=None, next_pos=None):
    """tokenizer.encode_arrays when the tokenizer has it (ours: numpy ids, no Python list per doc), else
    nanochat's tokenizer.encode(texts, prepend=bos, num_threads=threads)."""
    encode_arrays = getattr(tokenizer, "encode_arrays", None)
    if callable(encode_arrays):
        return Chunk(pos, next_pos, encode_arrays(texts, num_threads=threads), bos)
    return Chunk(pos, next_pos, tokenizer.encode(texts, prepend=bos, num_threads=threads))


def iter_doc_batches(plan, cursor, rank, world, batch_size, stop=None):
    """(texts, pos, next_pos) from cursor (epoch, pq_idx, rg_idx, row) on, forever (epochs wrap to shard 0).

    Each item is up to batch_size documents of one row group; pos is its first document's position and
    next_pos where the stream continues after it. A shard is acquired before its first row group is read
    and released after its last (of this rank's stride)."""
    epoch, pq_idx, rg_idx, row = cursor
    n = len(plan)
    fresh_epoch = pq_idx == 0 and rg_idx == rank and row == 0
    while True:
        produced = False
        while pq_idx < n:
            try:
                path = plan.acquire(pq_idx)
            except ShardSkipped as e:       # the downloader's failure policy is "skip"
                logger.warning("skipping shard %d: %s", plan.shard_ids[pq_idx], e)
                pq_idx, rg_idx, row = pq_idx + 1, rank, 0
                continue
            read_to_end = False
            try:
                pf = plan.open(path)
                num_rg = pf.num_row_groups
                while rg_idx < num_rg:
                    done = 0 if plan.rows_read is None else plan.rows_read(epoch, pq_idx, rg_idx)
                    if done is None:        # read in full before the world size changed (elastic resume)
                        rg_idx, row = rg_idx + world, 0
                        continue
                    texts = _read_texts(pf, rg_idx, path, plan.text_column)
                    row = max(row, done)
                    while row < len(texts):
                        if stop is not None and stop.is_set():
                            return
                        batch = texts[row:row + batch_size]
                        end = row + len(batch)
                        if end < len(texts):
                            nxt = (epoch, pq_idx, rg_idx, end)
                        elif rg_idx + world < num_rg:
                            nxt = (epoch, pq_idx, rg_idx + world, 0)
                        elif pq_idx + 1 < n:
                            nxt = (epoch, pq_idx + 1, rank, 0)
                        else:
                            nxt = (epoch + 1, 0, rank, 0)
                        yield batch, (epoch, pq_idx, rg_idx, row), nxt
                        produced = True
                        row = end
                    row = 0
                    rg_idx += world
                read_to_end = True
            finally:
                plan.release(pq_idx, consumed=read_to_end)
            pq_idx, rg_idx, row = pq_idx + 1, rank, 0
        if fresh_epoch and not produced:
            raise ConfigError(f"rank {rank} of {world} gets no documents from the {plan.split!r} split: its "
                              f"{n} shard(s) have too few row groups (or rows) for this world size")
        epoch, pq_idx, rg_idx, row = epoch + 1, 0, rank, 0
        fresh_epoch = True


class Prefetcher:
    """Reads document batches and tokenizes them in the background, handing chunks over in stream order.

    One thread walks the document stream; up to `in_flight` tokenizer.encode calls run at once (so the
    tokenizer's threads never idle while one call waits for its slowest document or its results are
    converted), and their results are queued strictly in order: the chunk stream is deterministic.
    """

    def __init__(self, make_iter, tokenize, depth=PREFETCH_CHUNKS, in_flight=ENCODE_CALLS_IN_FLIGHT):
        self.stop = threading.Event()
        self.queue = queue.Queue(maxsize=depth)
        self.tokenize = tokenize
        self.in_flight = in_flight
        self.thread = threading.Thread(target=self._run, args=(make_iter,), name="shardstream-loader",
                                       daemon=True)
        self.thread.start()

    def _put(self, item):
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def _run(self, make_iter):
        it = make_iter(self.stop)
        pending = deque()
        pool = ThreadPoolExecutor(self.in_flight, thread_name_prefix="shardstream-tokenize")
        try:
            for texts, pos, next_pos in it:
                pending.append(pool.submit(self.tokenize, texts, pos, next_pos))
                if len(pending) >= self.in_flight and not self._put(pending.popleft().result()):
                    return
            while pending:      # iter_doc_batches is infinite; this only runs when it stopped
                if not self._put(pending.popleft().result()):
                    return
        except BaseException as e:      # hand the error to the consumer
            self._put(e)
        finally:
            for f in pending:
                f.cancel()
            pool.shutdown(wait=False)
            it.close()

    def get(self):
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self):
        """Stop the thread. It may be blocked waiting for a shard: then it ends (releasing what it
        holds) as soon as that wait returns; close() does not wait for it beyond a second."""
        self.stop.set()
        self.thread.join(timeout=1.0)


# -----------------------------------------------------------------------------------------------------
# Best-fit packing

class Packer:
    """The document buffer in buckets by length; placements equal nanochat's scan of a list buffer.

    nanochat's buffer is a list in arrival order: the first of the largest docs that fit is the oldest of
    that length, so each bucket is a FIFO queue and `lengths` (sorted distinct lengths present) is
    searched with bisect.
    """

    def __init__(self, row_capacity):
        self.row_capacity = row_capacity
        self.lengths = []           # sorted distinct lengths with a non-empty bucket
        self.buckets = {}           # length -> deque of (chunk, index in chunk)
        self.count = 0

    def add(self, chunk, indices=None):
        buckets = self.buckets
        docs = chunk.docs
        extra = 0 if chunk.bos is None else 1       # the BOS the packer writes itself
        for i in (range(len(docs)) if indices is None else indices):
            L = len(docs[i]) + extra
            q = buckets.get(L)
            if q is None:
                q = buckets[L] = deque()
                bisect.insort(self.lengths, L)
            q.append((chunk, i))
        self.count += len(docs) if indices is None else len(indices)

    def _take(self, k):
        L = self.lengths[k]
        q = self.buckets[L]
        item = q.popleft()
        if not q:
            del self.buckets[L]
            del self.lengths[k]
        self.count -= 1
        return L, item

    def place(self, row, pos):
        """Place one doc into row[pos:]; returns the new position (row_capacity when the row is full)."""
        remaining = self.row_capacity - pos
        k = bisect.bisect_right(self.lengths, remaining) - 1
        if k >= 0:                              # the largest doc that fits
            L, (chunk, i) = self._take(k)
            end = pos + L
        else:                                   # none fits: crop the shortest
            _, (chunk, i) = self._take(0)
            end = self.row_capacity
        doc = chunk.docs[i]
        chunk.docs[i] = None
        if chunk.bos is not None:
            row[pos] = chunk.bos
            pos += 1
        row[pos:end] = doc if k >= 0 else doc[:end - pos]
        return end

    def snapshot(self):
        """The buffered documents as sorted [epoch, pq_idx, rg_idx, first_row, hex bitmask of rows]."""
        masks = {}
        for q in self.buckets.values():
            for chunk, i in q:
                masks[chunk.pos] = masks.get(chunk.pos, 0) | (1 << i)
        return [[*pos, format(m, "x")] for pos, m in sorted(masks.items())]


# -----------------------------------------------------------------------------------------------------
# State: fingerprint, parsing a resume state, rebuilding the buffer

def tokenizer_identity(tokenizer):
    """tokenizer.identity() when it has one (ours does); else a hash of the vocab size and a probe encode."""
    ident = getattr(tokenizer, "identity", None)
    if callable(ident):
        return str(ident())
    probe = "The quick brown fox, 1234 — naïve café. <x>\n\n  end"
    h = hashlib.sha256(repr((tokenizer.get_vocab_size(), tokenizer.get_bos_token_id(),
                             tokenizer.encode(probe))).encode()).hexdigest()
    return "probe-" + h[:16]


@dataclass(frozen=True)
class ResumePoint:
    cursor: tuple               # (epoch, pq_idx, rg_idx, row): the next chunk the packer pulls
    last: tuple                 # (epoch, pq_idx, rg_idx) last read: nanochat's keys
    anchor: dict | None         # the exact anchor to rebuild the buffer from (None: empty buffer)
    replay: int                 # batches to generate and drop after the anchor


def _fresh_start(rank):
    return ResumePoint(cursor=(1, 0, rank, 0), last=(1, 0, 0), anchor=None, replay=0)


def _nanochat_resume(state, rank, world, n_shards, why):
    """nanochat's approximate resume: the next row-group stride after rg_idx, the buffer starts empty."""
    try:
        pq_idx, rg_idx, epoch = int(state["pq_idx"]), int(state["rg_idx"]), int(state.get("epoch", 1))
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"resume state needs integer pq_idx, rg_idx (and epoch): got keys "
                          f"{sorted(state)}") from None
    logger.warning("approximate resume (%s): from shard index %d, after row group %d, epoch %d "
                   "(the rest of that row group stride and the packing buffer are skipped, as nanochat does)",
                   why, pq_idx, rg_idx, epoch)
    rg = (rg_idx // world + 1) * world + rank
    cursor = (epoch, pq_idx, rg, 0) if pq_idx < n_shards else (epoch + 1, 0, rank, 0)
    return ResumePoint(cursor=cursor, last=(epoch, pq_idx, rg_idx), anchor=None, replay=0)


def parse_resume_state(state, fingerprint, rank, world, n_shards):
    """A ResumePoint from resume_state_dict (None = from the start). Raises StateMismatchError/ConfigError."""
    if state is None:
        return _fresh_start(rank)
    if not isinstance(state, dict):
        raise ConfigError(f"resume_state_dict must be a dict (the state_dict the loader yielded), "
                          f"got {type(state).__name__}")
    if "version" not in state:
        return _nanochat_resume(state, rank, world, n_shards, "nanochat state without version")
    if state["version"] != STATE_VERSION:
        raise StateMismatchError(f"resume state has version {state['version']!r}, this loader reads version "
                                 f"{STATE_VERSION}: resume with the shardstream version that wrote it")
    saved = state.get("fingerprint")
    if not isinstance(saved, dict):
        raise StateMismatchError("resume state has no fingerprint: it is not a state this loader yielded")
    for key, value in fingerprint.items():
        if saved.get(key) != value:
            raise StateMismatchError(
                f"resume state does not match this loader: {key} was {saved.get(key)!r} when the state was "
                f"saved, now {value!r}. Resume with the same {key}, or start without resume_state_dict")
    if state.get("rank") != rank:
        return _nanochat_resume(state, rank, world, n_shards,
                                f"the state belongs to rank {state.get('rank')}, this is rank {rank}")
    try:
        anchor = state["anchor"]
        cursor = tuple(int(x) for x in anchor["cursor"])
        last = tuple(int(x) for x in anchor["last"])
        replay = int(state["replay"])
        docs = anchor["docs"]
        if len(cursor) != 4 or len(last) != 3 or replay < 0 or not isinstance(docs, list):
            raise ValueError
    except (KeyError, TypeError, ValueError):
        raise StateMismatchError("resume state is malformed (anchor/cursor/replay): it is not a state this "
                                 "loader yielded") from None
    return ResumePoint(cursor=cursor, last=last, anchor=anchor, replay=replay)


def rebuild_buffer(packer, docs, plan, tokenize, cursor):
    """Re-read and re-tokenize the anchor's buffered documents, adding them in stream order. A shard the
    stream (at cursor) goes on reading is handed back unconsumed: it must not be deleted and fetched again."""
    by_shard = {}
    for entry in docs:
        epoch, pq_idx, rg_idx, row, mask = entry
        by_shard.setdefault(int(pq_idx), set()).add(int(rg_idx))
    texts = {}
    for pq_idx in sorted(by_shard):
        if not 0 <= pq_idx < len(plan):
            raise StateMismatchError(f"resume state names shard index {pq_idx}, the split has {len(plan)}")
        path = plan.acquire(pq_idx, quiet=True)
        try:
            pf = plan.open(path)
            for rg_idx in sorted(by_shard[pq_idx]):
                texts[pq_idx, rg_idx] = _read_texts(pf, rg_idx, path, plan.text_column)
        finally:
            plan.release(pq_idx, consumed=pq_idx != cursor[1])     # the stream resumes in cursor[1] only
    for epoch, pq_idx, rg_idx, row, mask in docs:   # sorted by stream position when saved
        rg_texts = texts[int(pq_idx), int(rg_idx)]
        m = int(mask, 16)
        idx = [i for i in range(m.bit_length()) if m >> i & 1]
        picked = [rg_texts[row + i] for i in idx]
        sub = tokenize(picked, None, None)
        # lay the chunk out with the original indices so a later snapshot writes the same entry
        docs = [None] * (idx[-1] + 1)
        for j, i in enumerate(idx):
            docs[i] = sub.docs[j]
        packer.add(Chunk((int(epoch), int(pq_idx), int(rg_idx), int(row)), None, docs, sub.bos), idx)


# -----------------------------------------------------------------------------------------------------
# Getting batches onto the device

class BatchEmitter:
    """(B, T+1) rows -> (inputs, targets) on device. CUDA: pinned staging and one non_blocking copy."""

    def __init__(self, B, T, device):
        self.B, self.T = B, T
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            # two staging/device buffer pairs, alternated, so filling the next batch never races the
            # previous batch's asynchronous copy (an event guards each staging buffer)
            self.staging = [torch.empty(2 * B * T, dtype=torch.long, pin_memory=True) for _ in range(2)]
            self.on_device = [torch.empty(2 * B * T, dtype=torch.long, device=self.device) for _ in range(2)]
            self.events = [None, None]
            self.turn = 0

    def emit(self, rows):
        B, T = self.B, self.T
        if not self.cuda:
            both = np.empty((2, B, T), dtype=np.int64)
            both[0] = rows[:, :-1]
            both[1] = rows[:, 1:]
            t = torch.from_numpy(both)
            if self.device.type != "cpu":
                t = t.to(self.device)
            return t[0], t[1]
        k = self.turn
        self.turn ^= 1
        if self.events[k] is not None:
            self.events[k].synchronize()
        buf = self.staging[k].numpy().reshape(2, B, T)
        buf[0] = rows[:, :-1]
        buf[1] = rows[:, 1:]
        dev = self.on_device[k]
        dev.copy_(self.staging[k], non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        self.events[k] = ev
        return dev[:B * T].view(B, T), dev[B * T:].view(B, T)


# -----------------------------------------------------------------------------------------------------
# nanochat's names

def tokenizing_distributed_data_loader_with_state_bos_bestfit(
        tokenizer, B, T, split, tokenizer_threads=4, tokenizer_batch_size=128, device="cuda",
        resume_state_dict=None, buffer_size=1000, *, streaming_downloader=None, data_dir=None,
        ddp_rank=None, ddp_world_size=None, state_every=STATE_EVERY, prefetch=PREFETCH_CHUNKS,
        share_state=True, dist_timeout=None, text_column=None):
    """Infinite generator of (inputs, targets, state_dict); see the module docstring.

    Arguments are checked (and a resume state matched) when this is called, before the first batch.
    share_state / dist_timeout: under torchrun, whether rank 0's state carries every rank's cursor, and the
    seconds a silent rank is waited for (None: torchrun.DEFAULT_TIMEOUT). Called with neither a downloader
    nor a data dir (nanochat's way) they, the data dir and the row-group caps come from SHARDSTREAM_*.
    text_column: the column documents are read from, for a local data_dir ("text"); with a downloader,
    its text_column (a different one here is a ConfigError).
    """
    for name, v, lo in (("B", B, 1), ("T", T, 1), ("tokenizer_threads", tokenizer_threads, 1),
                        ("tokenizer_batch_size", tokenizer_batch_size, 1), ("buffer_size", buffer_size, 1),
                        ("state_every", state_every, 1), ("prefetch", prefetch, 1)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ConfigError(f"{name} must be an int >= {lo}, got {v!r}")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {device!r} is not a torch device (use 'cuda', 'cpu', 'mps', ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but CUDA is not available here: pass device='cpu'")
    if streaming_downloader is None and data_dir is None:
        from .streaming_env import env_downloader, local_settings   # the drop-in's edge (docs/NANOCHAT.md)
        lease = env_downloader(split, resuming=resume_state_dict is not None)    # SHARDSTREAM_STREAMING=1
        data_dir, share_state, dist_timeout = local_settings()
        if lease is not None:
            return lease.run(lambda dl: tokenizing_distributed_data_loader_with_state_bos_bestfit(
                tokenizer, B, T, split, tokenizer_threads, tokenizer_batch_size, device, resume_state_dict,
                buffer_size, streaming_downloader=dl, ddp_rank=ddp_rank, ddp_world_size=ddp_world_size,
                state_every=state_every, prefetch=prefetch, share_state=share_state, dist_timeout=dist_timeout,
                text_column=text_column))
    plan = ShardPlan(split, streaming_downloader, data_dir, text_column)
    if plan.stride is not None and ddp_rank is None and ddp_world_size is None:
        ddp_rank, ddp_world_size = plan.stride          # partition="node": row groups over the local ranks
    rank, world = get_dist_info(ddp_rank, ddp_world_size)
    bos = tokenizer.get_bos_token_id()
    fingerprint = {"split": split, "source": plan.source, "shards": len(plan), "B": B, "T": T,
                   "world_size": world, "tokenizer": tokenizer_identity(tokenizer),
                   "buffer_size": buffer_size, "tokenizer_batch_size": tokenizer_batch_size}
    if plan.text_column != TEXT_COLUMN:     # another column is another stream (absent for `text`, so the
        fingerprint["text_column"] = plan.text_column   # states saved before text_column= still resume)
    from .loadersync import LoaderSync       # DDP: rank 0's state carries every rank's (exact resume)
    sync = LoaderSync.for_loader(split, rank, world, fingerprint, resume_state_dict, share_state=share_state,
                                 timeout=dist_timeout)
    if sync is not None:
        resume_state_dict, plan.rows_read = sync.resume_state, sync.rows_read
    start = parse_resume_state(resume_state_dict, fingerprint, rank, world, len(plan))
    gen = _generate(tokenizer, bos, B, T, plan, rank, world, fingerprint, start, device,
                    tokenizer_threads, tokenizer_batch_size, buffer_size, state_every, prefetch)
    return gen if sync is None else sync.wrap(gen)


def _generate(tokenizer, bos, B, T, plan, rank, world, fingerprint, start, device, threads, batch_size,
              buffer_size, state_every, prefetch):
    def tokenize(texts, pos, next_pos):
        return tokenize_chunk(tokenizer, texts, bos, threads, pos, next_pos)

    row_capacity = T + 1
    packer = Packer(row_capacity)
    cursor, last = start.cursor, start.last
    anchor, replay = start.anchor, start.replay
    if anchor is not None:
        rebuild_buffer(packer, anchor["docs"], plan, tokenize, cursor)
    emitter = BatchEmitter(B, T, device)
    feed = Prefetcher(lambda stop, at=cursor: iter_doc_batches(plan, at, rank, world, batch_size, stop),
                      tokenize, prefetch)
    since_anchor = 0
    try:
        while True:
            if anchor is None or since_anchor >= state_every:
                anchor = {"cursor": list(cursor), "last": list(last), "docs": packer.snapshot()}
                since_anchor = 0
            state = {"version": STATE_VERSION, "pq_idx": last[1], "rg_idx": last[2], "epoch": last[0],
                     "rank": rank, "fingerprint": fingerprint, "anchor": anchor, "replay": since_anchor,
                     "cursor": list(cursor)}
            rows = np.empty((B, row_capacity), dtype=np.int64)
            for r in range(B):
                row = rows[r]
                pos = 0
                while pos < row_capacity:
                    while packer.count < buffer_size:
                        chunk = feed.get()
                        packer.add(chunk)
                        cursor = chunk.next_pos
                        last = chunk.pos[:3]
                    pos = packer.place(row, pos)
            since_anchor += 1
            if replay > 0:
                replay -= 1
                continue
            inputs, targets = emitter.emit(rows)
            yield inputs, targets, state
    finally:
        feed.close()


def tokenizing_distributed_data_loader_bos_bestfit(*args, **kwargs):
    """nanochat's loader without the state: yields (inputs, targets). Same arguments."""
    return _without_state(tokenizing_distributed_data_loader_with_state_bos_bestfit(*args, **kwargs))


def _without_state(batches):
    try:
        for inputs, targets, _ in batches:
            yield inputs, targets
    finally:
        batches.close()


# the seed's name for the same loader
tokenizing_distributed_data_loader_with_state = tokenizing_distributed_data_loader_with_state_bos_bestfit
