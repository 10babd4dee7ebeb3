"""The reference trainer behind `python -m scripts.base_train`: nanochat's base_train in small.

    python -m scripts.base_train --depth=4 --device_batch_size=1 --num_iterations=100 --streaming_mode=True

A tiny GPT (gpt.py) trained on the parquet shards: a BPE tokenizer trained offline from the first shard
(rustbpe, encoded with tiktoken; saved and reused), gradient accumulation up to --total_batch_size, a
warmup/warmdown learning-rate schedule, AdamW, and a periodic val loss on the val shard. With
--streaming_mode=True the shards come from a StreamingDownloader that keeps --streaming_buffer_size shards
ahead of the loader under --max_cache_bytes; otherwise it reads the shards already in --data_dir, as
nanochat does.

Any parquet corpus (manifest.py): --files GLOB (repeatable) and --val-files GLOB|none pick the files of a
listed --source (hf://, s3://, gs://, a local dir), --manifest FILE names them (the way for an https
mirror), --text_column NAME is the column holding the documents; SHARDSTREAM_FILES / _VAL_FILES /
_MANIFEST / _TEXT_COLUMN fill them when the flags are absent. Shard i is the manifest's file i (train then
val); the tokenizer trains on train file 0, --streaming_total_shards=-1 counts the train files the run
needs by their listed sizes (at most all of them), and --val-files none skips the val loss. The checkpoint
fingerprint carries the manifest's digest, so a resume against another file set fails, saying so.

The loop is nanochat's: the first batch is fetched before step 0 and each step fetches the next batch while
it trains on the current one. A checkpoint at step s holds the model and optimizer after s steps plus the
loader state that came with the batch step s will train on, so `--resume_from_step s` continues with
exactly the batches the uninterrupted run would have seen. Checkpoints are single files written atomically
(temp file, fsync, rename) and carry a fingerprint (source, dataset, tokenizer, batch geometry, model);
resuming against a different one fails, naming what differs.

Under torchrun (`torchrun --standalone --nproc_per_node=8 -m scripts.base_train --streaming_mode=True`) each
process is one DDP rank (distributed.setup_ddp: gloo on CPU, nccl on CUDA, one GPU per local rank). A step
is --total_batch_size tokens over all ranks (device_batch_size * max_seq_len * world size per micro-step),
gradients are averaged by DDP, and streaming uses distributed.make_node_downloader: one downloader per node
(--streaming_partition=global reads every shard on every node, =node gives node n the shards n, n+N, ...).
Local rank 0 trains the tokenizer and measures shard 0; the other ranks wait at a barrier and load it. Only
rank 0 logs (the other ranks log warnings and errors only) and writes checkpoints; its loader state carries
every rank's cursor, so every rank resumes from it exactly. The val loss is averaged over the ranks.

What a streaming run says (rank 0): every step line ends with the data wait (status.py's one definition:
the loader's readers blocked on shards not downloaded yet; the Done line, the [Streaming] lines, `shardstream
status` and the demo's summary show the same figure); while the loop itself waits for a batch, a line every
WAIT_LOG_EVERY seconds says for how long. `[Streaming]` lines come after the first step, every
--status_every steps and once at the end, naming the shard in training (the loader state's pq_idx, also
written to the event log as "training_shard") and the loader's read-ahead. --streaming_total_shards counts
train shards (the val shard besides), as SHARDSTREAM_TOTAL_SHARDS and StreamingDownloader(total_shards=)
do. --require_checksum and --verify decode set how every shard is checked, shard 0 included, which the
trainer fetches itself for the tokenizer (its "downloaded" event says by="trainer").

SIGTERM and Ctrl-C stop the run at the next step boundary (or at once when it is waiting for data): with
--save_every set a final checkpoint is written, the downloader's threads are stopped (partial files stay
resumable), and main() returns 128 + the signal number. Under torchrun the ranks agree on the stop at
each step boundary (one all_reduce), so a signal on any one rank stops them all at the same step, and a
wait for data inside a step is not cut short (the other ranks would hang in the gradient all-reduce).
"""
import argparse
import bisect
import contextlib
import hashlib
import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import ConfigError, ShardStreamError, StateMismatchError
from .fetch import VERIFY_LEVELS
from .shards import DATASETS, DEFAULT_DATASET, default_data_dir, list_shards, nanochat_base_dir, shard_name
from .units import parse_bytes

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "shardstream-ckpt/1"
TOKENIZER_META = "shardstream_tokenizer.json"
# Fingerprint fields a resume must match, and how to say each one in an error.
LOADER_BUFFER_DOCS = 1000      # the loader's buffer_size (nanochat's default)
LOADER_BATCH_DOCS = 128        # its tokenizer_batch_size
WAIT_LOG_EVERY = 5.0           # seconds between step-log lines while the loop waits for data
RESUME_MUST_MATCH = {
    "data": "data source", "dataset_shards": "dataset shard count", "tokenizer": "tokenizer",
    "vocab_size": "vocab size", "device_batch_size": "--device_batch_size", "max_seq_len": "--max_seq_len",
    "total_batch_size": "--total_batch_size", "model": "model shape (--depth)",
}   # world_size may change: the loader resumes elastically (docs/DISTRIBUTED.md), grad accumulation adapts


# -----------------------------------------------------------------------------------------------------
# Command line

def parse_bool(text):
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on", "y", "t"):
        return True
    if value in ("0", "false", "no", "off", "n", "f"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def budget_bytes(text):
    """--max_cache_bytes: '2000000', '500MB', '1.5GiB' -> bytes (units.parse_bytes), as an argparse type."""
    try:
        return parse_bytes(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(f"{e}; write a disk budget like 2GB, 500MB or 2000000000") from None


def parse_step(text):
    """--resume_from_step: a step number, -1 (no resume) or 'latest'."""
    if str(text).strip().lower() == "latest":
        return "latest"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a step number, -1 or 'latest', got {text!r}") from None


def build_parser():
    p = argparse.ArgumentParser(prog="python -m scripts.base_train", allow_abbrev=False,
                                description="Pretrain a tiny GPT on parquet shards, optionally streamed under a "
                                            "disk budget. Every flag also takes nanochat's dashed spelling.")

    def add(name, **kw):
        names = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        p.add_argument(*names, dest=name, **kw)

    def add_bool(name, default, help_):
        add(name, type=parse_bool, nargs="?", const=True, default=default, metavar="BOOL", help=help_)

    add("depth", type=int, default=4, help="transformer layers; width = depth*64 (default 4)")
    add("max_seq_len", type=int, default=512, help="tokens per row (default 512)")
    add("device_batch_size", type=int, default=8, help="rows per micro-batch (default 8)")
    add("total_batch_size", type=int, default=-1,
        help="tokens per optimizer step; a multiple of device_batch_size*max_seq_len (-1 = one micro-batch)")
    add("num_iterations", type=int, default=-1,
        help="optimizer steps (-1 = from --target_param_data_ratio, Chinchilla-style)")
    add("target_param_data_ratio", type=float, default=20.0, help="tokens per parameter when num_iterations=-1")
    add("lr", type=float, default=3e-3, help="peak AdamW learning rate (default 3e-3)")
    add("weight_decay", type=float, default=0.0, help="AdamW weight decay on the blocks' matrices")
    add("warmup_ratio", type=float, default=0.05, help="fraction of steps warming the LR up")
    add("warmdown_ratio", type=float, default=0.3, help="fraction of steps decaying the LR at the end")
    add("final_lr_frac", type=float, default=0.0, help="final LR as a fraction of the peak")
    add("grad_clip", type=float, default=1.0, help="gradient-norm clip (0 disables)")
    add("eval_every", type=int, default=250, help="steps between val losses (-1: only at the end)")
    add("eval_tokens", type=int, default=-1, help="tokens per val loss (-1 = 4 micro-batches, 0 disables)")
    add("core_metric_every", type=int, default=-1, help="accepted for nanochat compatibility; no CORE here")
    add("core_metric_max_per_task", type=int, default=-1, help="accepted for nanochat compatibility")
    add("sample_every", type=int, default=-1, help="accepted for nanochat compatibility")
    add("run", default="dummy", help="accepted for nanochat compatibility (wandb run name; unused)")
    add_bool("streaming_mode", False, "stream shards from --source with a StreamingDownloader")
    add("streaming_buffer_size", type=int, default=5, help="shards kept ready ahead of the reader (default 5)")
    add("streaming_total_shards", type=int, default=-1,
        help="train shards to stream (0..N-1; the val shard is fetched besides, as SHARDSTREAM_TOTAL_SHARDS and "
             "StreamingDownloader(total_shards=) count them); -1 = computed from the tokens the run needs, at most "
             "every train file")
    add("streaming_retain", type=int, default=0, help="consumed shards kept on disk behind the reader")
    add("streaming_partition", default="global", choices=["global", "node"],
        help="under torchrun with several nodes: global = every node reads every shard (nanochat's order); "
             "node = node n reads shards n, n+N, ... only (each node stores 1/N)")
    add("streaming_prefetch", default="fixed", choices=["fixed", "auto"],
        help="fixed = keep --streaming_buffer_size shards ahead; auto = as many as the measured rates ask for")
    add("source", default=None, help="base URL of the shards (default SHARDSTREAM_SOURCE, else the Hub)")
    add("dataset", default=DEFAULT_DATASET, choices=sorted(DATASETS), help="known dataset on the Hub")
    add("dataset_shards", type=int, default=None, help="shards in a custom --source (the last is val)")
    add("files", action="append", default=None, metavar="GLOB",
        help="train files of a listed --source: a glob over the paths under it ('sample/10BT/*.parquet', "
             "'data/**/*.parquet'); repeat for several (default SHARDSTREAM_FILES, else nanochat's "
             "shard_XXXXX.parquet, else every **/*.parquet)")
    add("val_files", default=None, metavar="GLOB|none",
        help="val files: a glob (taken out of the train files), or none to train on all and skip the val loss "
             "(default SHARDSTREAM_VAL_FILES, else the last file)")
    add("manifest", default=None, metavar="FILE",
        help="a text file naming the files to read, one path relative to --source (or one URL) per line "
             "(default SHARDSTREAM_MANIFEST)")
    add("text_column", default=None, metavar="NAME",
        help="the parquet column holding the documents (default SHARDSTREAM_TEXT_COLUMN, else text)")
    add("data_dir", default=None, help="shard directory (default SHARDSTREAM_DATA_DIR, else nanochat's)")
    add("max_cache_bytes", type=budget_bytes, default=None, help="disk budget of the data dir, e.g. 2GB")
    add_bool("require_checksum", False, "refuse a shard the source gives no sha256/md5 for (default: checked by "
                                        "size and parquet footer then)")
    add("verify", default="footer", choices=list(VERIFY_LEVELS),
        help="footer: size, checksum when there is one, parquet footer (default); decode: also read and "
             "decompress every page before a shard is used")
    add("vocab_size", type=int, default=32768, help="BPE vocab size incl. special tokens (default 32768)")
    add("tokenizer_dir", default=None, help="where the tokenizer is saved and reused")
    add("checkpoint_dir", default=None, help="where checkpoints go (default <base>/shardstream/base_checkpoints/dN)")
    add("save_every", type=int, default=-1, help="steps between checkpoints (-1: only at the end)")
    add("resume_from_step", type=parse_step, default=-1, help="resume from this checkpoint step (or 'latest')")
    add("device", default="", help="cpu or cuda (default: cuda when available)")
    add("seed", type=int, default=42, help="model init seed")
    add("status_every", type=int, default=100,
        help="steps between [Streaming] status lines (also one after the first step and one at the end)")
    add("log_every", type=int, default=1, help="steps between step lines (the first and last always log)")
    add("tokenizer_threads", type=int, default=4, help="threads for tokenizing documents")
    add("batch_hash_log", default=None, help="append one 'step micro sha256' line per trained batch to FILE "
                                               "(under torchrun rank R > 0 writes FILE.rankR)")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    positive = ["depth", "max_seq_len", "device_batch_size", "streaming_buffer_size", "vocab_size",
                "tokenizer_threads", "status_every", "log_every"]
    for name in positive:
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.num_iterations == 0 or args.num_iterations < -1:
        raise ConfigError(f"--num_iterations must be >= 1 (or -1 for automatic), got {args.num_iterations}")
    if args.streaming_total_shards == 0 or args.streaming_total_shards < -1:
        raise ConfigError(f"--streaming_total_shards must be >= 1 train shards (or -1 for automatic), "
                          f"got {args.streaming_total_shards}")
    if args.streaming_retain < 0:
        raise ConfigError(f"--streaming_retain must be >= 0, got {args.streaming_retain}")
    from .distributed import node_info
    world = node_info().world_size              # torchrun's WORLD_SIZE (1 outside torchrun)
    row_tokens = args.device_batch_size * args.max_seq_len * world
    if args.total_batch_size == -1:
        args.total_batch_size = row_tokens
    if args.total_batch_size < 1 or args.total_batch_size % row_tokens:
        across = f" * world size {world}" if world > 1 else ""
        raise ConfigError(f"--total_batch_size {args.total_batch_size} must be a positive multiple of "
                          f"device_batch_size*max_seq_len{across} = {row_tokens}")
    for name in ("warmup_ratio", "warmdown_ratio", "final_lr_frac"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise ConfigError(f"--{name} must be within [0, 1], got {getattr(args, name)}")
    if args.warmup_ratio + args.warmdown_ratio > 1.0:
        raise ConfigError("--warmup_ratio + --warmdown_ratio must not exceed 1")
    # The trainer is an edge: the SHARDSTREAM_* settings it honours are read here, once, and passed on.
    from .settings import read_all
    from .verify import configure_row_group_limits
    env = read_all(["SHARDSTREAM_SOURCE", "SHARDSTREAM_DATA_DIR", "SHARDSTREAM_MAX_ROW_GROUP_BYTES",
                    "SHARDSTREAM_MAX_ROW_GROUP_ROWS", "SHARDSTREAM_DIST_TIMEOUT", "SHARDSTREAM_SHARE_STATE",
                    "SHARDSTREAM_FILES", "SHARDSTREAM_VAL_FILES", "SHARDSTREAM_MANIFEST", "SHARDSTREAM_TEXT_COLUMN"])
    configure_row_group_limits(env["SHARDSTREAM_MAX_ROW_GROUP_BYTES"], env["SHARDSTREAM_MAX_ROW_GROUP_ROWS"])
    args.source = args.source or env["SHARDSTREAM_SOURCE"]
    args.data_dir = args.data_dir or env["SHARDSTREAM_DATA_DIR"]
    # a flag wins over its variable; the flags also reach a run made with train(args) directly
    args.files = args.files if args.files is not None else env["SHARDSTREAM_FILES"]
    args.val_files = args.val_files if args.val_files is not None else env["SHARDSTREAM_VAL_FILES"]
    args.manifest = args.manifest if args.manifest is not None else env["SHARDSTREAM_MANIFEST"]
    args.text_column = args.text_column if args.text_column is not None else env["SHARDSTREAM_TEXT_COLUMN"]
    if not args.text_column.strip() or any(ord(c) < 32 or ord(c) == 127 for c in args.text_column):
        raise ConfigError(f"--text_column {args.text_column!r}: write the name of the parquet column holding "
                          f"the documents (like text or content)")
    for name in ("files", "val_files", "manifest"):
        if getattr(args, name) is not None and not args.streaming_mode:
            raise ConfigError(f"--{name} (or SHARDSTREAM_{name.upper()}) picks the files of a --source, which "
                              f"only a streaming run reads: add --streaming_mode=True (a local folder works as "
                              f"--source too), or unset it")
    args.dist_timeout, args.share_state = env["SHARDSTREAM_DIST_TIMEOUT"], env["SHARDSTREAM_SHARE_STATE"]
    return args


# -----------------------------------------------------------------------------------------------------
# Schedule, device, small helpers

def lr_multiplier(step, num_iterations, warmup_ratio, warmdown_ratio, final_lr_frac):
    """Linear warmup, constant, linear warmdown to final_lr_frac (nanochat's shape)."""
    warmup = round(warmup_ratio * num_iterations)
    warmdown = round(warmdown_ratio * num_iterations)
    if step < warmup:
        return (step + 1) / warmup
    if step <= num_iterations - warmdown:
        return 1.0
    progress = (num_iterations - step) / warmdown
    return progress + (1 - progress) * final_lr_frac


def pick_device(name):
    import torch
    if not name:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    if name not in ("cpu", "mps") and not name.startswith("cuda"):
        raise ConfigError(f"--device must be cpu, cuda, cuda:N or mps, got {name!r}")
    return name


def batch_digest(x, y):
    h = hashlib.sha256()
    h.update(x.detach().cpu().numpy().tobytes())
    h.update(y.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:24]


def _short_hash(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


# -----------------------------------------------------------------------------------------------------
# Tokenizer: trained once from the first shard, reused afterwards

def packed_rows(doc_lengths, row_capacity, buffer_size=1000):
    """Rows best-fit packing makes from documents of these token lengths (the loader's rule, simulated).

    Each row takes the longest buffered doc that fits the space left; when none fits, the shortest is
    cropped to fill the row and its rest is dropped. So short rows waste many tokens on long documents.
    """
    pending = iter(doc_lengths)
    buf = []
    rows = 0
    while True:
        pos = 0
        while pos < row_capacity:
            for n in pending:
                bisect.insort(buf, n)
                if len(buf) >= buffer_size:
                    break
            if not buf:
                return rows
            i = bisect.bisect_right(buf, row_capacity - pos) - 1
            if i >= 0:
                pos += buf.pop(i)
            else:
                buf.pop(0)
                pos = row_capacity
        rows += 1


@dataclass(frozen=True)
class ShardYield:
    """What one shard gives a run with rows of T tokens (measured on the first shard)."""
    docs: int                 # documents (parquet rows)
    raw_tokens: int           # their tokens, BOS included
    trained_tokens: int       # tokens in the rows best-fit packing makes of them (cropped rests dropped)


def _open_texts(path, column):
    """The parquet file at path, checked to hold `column` (ConfigError naming the columns it has)."""
    import pyarrow.parquet as pq
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if column not in names:
        raise ConfigError(f"{Path(path).name} has no {column!r} column (its columns: {', '.join(names)}): give "
                          f"--text_column NAME (SHARDSTREAM_TEXT_COLUMN) naming the one that holds the documents")
    return pf


def shard_texts(path, column="text", max_chars=10_000_000, doc_cap=10_000):
    """Documents from `column` of the parquet file at path, each cropped to doc_cap chars, up to max_chars
    (what the tokenizer trains on: tokenizer.iter_shard_texts, for any column)."""
    pf = _open_texts(path, column)
    total = 0
    for rg in range(pf.num_row_groups):
        for text in pf.read_row_group(rg, columns=[column]).column(column).to_pylist():
            text = text[:doc_cap]
            yield text
            total += len(text)
            if total >= max_chars:
                return


def measure_shard_yield(tokenizer, path, T, sample_chars=4_000_000, threads=4, column="text"):
    """A ShardYield for the shard at path, from its first documents (about sample_chars) scaled by its rows."""
    pf = _open_texts(path, column)
    rows = pf.metadata.num_rows
    bos = tokenizer.get_bos_token_id()
    lengths, chars = [], 0
    for rg in range(pf.num_row_groups):
        texts = pf.read_row_group(rg, columns=[column]).column(column).to_pylist()
        for start in range(0, len(texts), 256):
            batch = texts[start:start + 256]
            lengths += [len(ids) for ids in tokenizer.encode(batch, prepend=bos, num_threads=threads)]
            chars += sum(len(t) for t in batch)
            if chars >= sample_chars:
                break
        if chars >= sample_chars:
            break
    if not lengths:
        raise ConfigError(f"{path} holds no documents; cannot measure tokens per shard")
    scale = rows / len(lengths)
    return ShardYield(docs=rows, raw_tokens=max(1, round(sum(lengths) * scale)),
                      trained_tokens=max(1, round(packed_rows(lengths, T + 1) * T * scale)))


def shards_needed(tokens_needed, shard_yield, train_shards=None, read_ahead_docs=0, sizes=None):
    """Train shards the run reads, rounded up (capped at the dataset's train_shards); the val shard comes besides.

    The loader reads read_ahead_docs documents beyond the last row it hands out (its packing buffer and
    prefetch); counting them keeps a short run from wrapping into a second epoch it never trains on.
    sizes: the train files' sizes in bytes, in read order (the manifest's; shard 0 is the one measured).
    Files of any size then count by their bytes, at shard 0's documents per byte; without them (or with one
    unknown) every shard is taken to hold what shard 0 does.
    """
    docs = tokens_needed * shard_yield.docs / shard_yield.trained_tokens + read_ahead_docs
    if sizes and all(isinstance(b, int) and b > 0 for b in sizes):
        need = docs / shard_yield.docs * sizes[0]       # bytes, at shard 0's density
        total = 0
        for n, size in enumerate(sizes[:train_shards] if train_shards else sizes, 1):
            total += size
            if total >= need * (1 - 1e-12):
                return n
        return n
    n = max(1, math.ceil(docs / shard_yield.docs))
    return min(n, train_shards) if train_shards else n


def loader_read_ahead_docs():
    """Documents the loader reads beyond the rows it has handed out: its packing buffer, its prefetch
    queue of tokenized batches, and one batch in flight on each side of the queue."""
    from .loader import PREFETCH_CHUNKS
    return LOADER_BUFFER_DOCS + (PREFETCH_CHUNKS + 2) * LOADER_BATCH_DOCS


def _read_tokenizer_meta(directory):
    try:
        with open(Path(directory) / TOKENIZER_META) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _write_json_atomic(path, obj):
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def prepare_tokenizer(tokenizer_dir, vocab_size, first_shard, data_key, T, threads=4, column="text"):
    """(tokenizer, ShardYield at row length T): load from tokenizer_dir or train from the first shard and save.

    first_shard() returns the path of the first train shard (fetching it if need be); it is only called
    when something is missing. The tokens-per-shard measurement is remembered per data source. column:
    the parquet column holding the documents.
    """
    from .tokenizer import Tokenizer, train_tokenizer
    tokenizer_dir = Path(tokenizer_dir)
    meta = _read_tokenizer_meta(tokenizer_dir)
    tokenizer = None
    if (tokenizer_dir / "tokenizer.pkl").is_file():
        tokenizer = Tokenizer.load(tokenizer_dir)
        if meta.get("requested_vocab_size", tokenizer.get_vocab_size()) != vocab_size:
            raise ConfigError(f"the tokenizer in {tokenizer_dir} was trained with vocab size "
                              f"{meta.get('requested_vocab_size')}, not --vocab_size {vocab_size}: give another "
                              f"--tokenizer_dir or the matching --vocab_size")
        logger.info("Tokenizer: reusing %s (vocab %d) from %s", tokenizer.identity(), tokenizer.get_vocab_size(),
                    tokenizer_dir)
    path = None
    if tokenizer is None:
        path = first_shard()
        t0 = time.time()
        tokenizer = train_tokenizer(shard_texts(path, column), vocab_size)
        tokenizer.save(tokenizer_dir)
        meta = {"identity": tokenizer.identity(), "requested_vocab_size": vocab_size,
                "trained_on": shard_name(0) if path is None else Path(path).name, "shard_yield": {}}
        logger.info("Tokenizer: trained %s (vocab %d) on %s in %.1fs, saved to %s", tokenizer.identity(),
                    tokenizer.get_vocab_size(), Path(path).name, time.time() - t0, tokenizer_dir)
    key = f"{data_key} T={T}"
    known = meta.get("shard_yield", {}).get(key) if meta.get("identity") == tokenizer.identity() else None
    if known:
        shard_yield = ShardYield(**known)
    else:
        path = path or first_shard()
        shard_yield = measure_shard_yield(tokenizer, path, T, threads=threads, column=column)
        meta.setdefault("shard_yield", {})[key] = asdict(shard_yield)
        meta["identity"] = tokenizer.identity()
        meta.setdefault("requested_vocab_size", vocab_size)
        _write_json_atomic(tokenizer_dir / TOKENIZER_META, meta)
        logger.info("Tokenizer: %s holds %s documents, about %s tokens, %s of them in packed rows of %d",
                    Path(path).name, f"{shard_yield.docs:,}", f"{shard_yield.raw_tokens:,}",
                    f"{shard_yield.trained_tokens:,}", T)
    return tokenizer, shard_yield


# -----------------------------------------------------------------------------------------------------
# Checkpoints: one file per step, written atomically

def checkpoint_path(checkpoint_dir, step):
    return Path(checkpoint_dir) / f"step_{step:06d}.pt"


def checkpoint_steps(checkpoint_dir):
    d = Path(checkpoint_dir)
    if not d.is_dir():
        return []
    steps = []
    for p in d.glob("step_*.pt"):
        try:
            steps.append(int(p.stem.split("_", 1)[1]))
        except ValueError:
            pass
    return sorted(steps)


def save_checkpoint(checkpoint_dir, step, payload):
    """torch.save to a temp file in the same dir, fsync, rename: a checkpoint is whole or absent."""
    import torch
    d = Path(checkpoint_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(d, step)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return path


def load_checkpoint(checkpoint_dir, step):
    import torch
    if step == "latest":
        steps = checkpoint_steps(checkpoint_dir)
        if not steps:
            raise ConfigError(f"--resume_from_step latest: no checkpoints in {checkpoint_dir}")
        step = steps[-1]
    path = checkpoint_path(checkpoint_dir, step)
    if not path.is_file():
        have = checkpoint_steps(checkpoint_dir)
        raise ConfigError(f"--resume_from_step {step}: no checkpoint {path}"
                          + (f" (steps saved there: {', '.join(map(str, have))})" if have else
                             " (that directory holds none; give --checkpoint_dir)"))
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint")
    return ckpt


def check_resume(saved, current, step):
    """Raise StateMismatchError naming every fingerprint field that differs."""
    diffs = []
    for key, label in RESUME_MUST_MATCH.items():
        if saved.get(key) != current.get(key):
            diffs.append(f"{label}: checkpoint has {saved.get(key)!r}, this run has {current.get(key)!r}")
    if saved.get("data") != current.get("data") and "#manifest-" in f"{saved.get('data')}{current.get('data')}":
        diffs.append("the files differ (another --files/--val-files/--manifest, or a file changed at the source)")
    if diffs:
        raise StateMismatchError(f"cannot resume from step {step}: the checkpoint belongs to a different run "
                                 f"({'; '.join(diffs)}). Resume with the original settings, or start a new "
                                 f"run with another --checkpoint_dir.")


def checkpoint_train_shards(ckpt):
    """The train shards a checkpoint's run streamed (None: not a streaming run). Checkpoints written before
    the flag counted train shards only kept "total_shards", the val shard included."""
    if ckpt.get("train_shards"):
        return ckpt["train_shards"]
    return ckpt["total_shards"] - 1 if ckpt.get("total_shards") else None


def check_train_shards(n, source):
    """ConfigError unless n train shards fit the source; a count that takes the val shard in says so."""
    have = source.num_train_shards
    if 1 <= n <= have:
        return
    val = source.val_shards
    if not val:
        why, which = "there are no val files (--val-files none)", "no val shard"
    else:
        which = f"shard {val[0]} is val" if len(val) == 1 else f"shards {val[0]}..{val[-1]} are val"
        them = "the val shard is" if len(val) == 1 else f"the {len(val)} val shards are"
        why = f"{them} fetched besides"
        if n == source.dataset_shards:
            why = (f"{n} is the dataset's count with the val shard{'s' if len(val) > 1 else ''}, but the flag "
                   f"counts train shards only ({why})")
    raise ConfigError(f"--streaming_total_shards {n}: {source.name} has {have} train shards (0..{have - 1}; "
                      f"{which}) and {why}: give 1..{have} ({have} for all of them), or -1 for what the run needs")


def train_sizes(source):
    """The train files' sizes in bytes, in read order, from the source's listing (None when one is unknown:
    an unlisted https source)."""
    sizes = [getattr(source.listed(i), "size", None) for i in range(source.num_train_shards)]
    return sizes if sizes and all(isinstance(b, int) and b > 0 for b in sizes) else None


def text_column(args):
    """The parquet column holding the documents (parse_args fills it from SHARDSTREAM_TEXT_COLUMN)."""
    return getattr(args, "text_column", None) or "text"


def shard_bytes(data_dir):
    """Bytes of the shard files and partial downloads in data_dir (what the downloader's bytes_on_disk counts)."""
    from .manifest import is_cache_name
    total = 0
    for e in os.scandir(data_dir):
        final = e.name.split(".parquet", 1)[0] + ".parquet"     # a partial's name starts with its shard's
        ours = e.name.startswith("shard_") or is_cache_name(final)
        if ours and (e.name.endswith(".parquet") or e.name.endswith(".partial")):
            try:
                total += e.stat(follow_symlinks=False).st_size
            except OSError:
                pass
    return total


def log_event(data_dir, event, **fields_):
    """One event of the trainer's into the data dir's event log, beside the downloader's (status.py)."""
    from .status import EventLog
    log = EventLog(data_dir)
    try:
        log.write(event, **fields_)
    finally:
        log.close()


# -----------------------------------------------------------------------------------------------------
# Signals: stop at a step boundary, or at once while waiting for data

class StopRun(Exception):
    """Raised by the signal handler while the loop waits for a batch."""


class SignalStop:
    """Turns SIGINT/SIGTERM into a stop request; a second signal interrupts at once."""

    def __init__(self):
        self.signum = None
        self.waiting_for_data = False
        self._previous = {}

    def __enter__(self):
        import threading
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        logger.warning("Received %s: stopping at the next step boundary", signal.Signals(signum).name)
        if self.waiting_for_data:
            raise StopRun

    @property
    def requested(self):
        return self.signum is not None

    def waiting(self, fn, *args):
        """fn(*args), which only waits for data, so a signal may interrupt it at once (raising StopRun)."""
        self.waiting_for_data = True
        try:
            if self.requested:
                raise StopRun
            return fn(*args)
        finally:
            self.waiting_for_data = False


class WaitWatch:
    """While the loop waits for a batch longer than `every` seconds, a step-log line every `every` seconds
    saying so (text(seconds blocked) writes it): a wait in progress shows in the log as it happens."""

    def __init__(self, text, every=WAIT_LOG_EVERY):
        import threading
        self.text, self.every = text, every
        self.since = None           # monotonic time the loop began to wait, None while it trains
        self.last = 0.0             # when the last line was logged
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="shardstream-train-waitwatch", daemon=True)
        self.thread.start()

    def waiting(self, fn, *args):
        self.since = time.monotonic()
        try:
            return fn(*args)
        finally:
            self.since = None

    def _run(self):
        said = None
        while not self.done.wait(0.25):
            since, now = self.since, time.monotonic()
            if since is None or now - since < self.every or (said == since and now - self.last < self.every):
                continue
            said, self.last = since, now
            try:
                logger.info("%s", self.text(now - since))
            except Exception as e:      # a status that cannot be had must not end the run
                logger.debug("wait line: %s", e)

    def close(self):
        self.done.set()
        self.thread.join()


# -----------------------------------------------------------------------------------------------------
# The run

@dataclass
class TrainResult:
    """What a run did (the demo prints it)."""
    exit_code: int = 0
    start_step: int = 0
    step: int = 0                             # optimizer steps completed
    num_iterations: int = 0
    losses: list = field(default_factory=list)        # (step, train loss)
    val_losses: list = field(default_factory=list)    # (step, val loss)
    step_times: list = field(default_factory=list)    # (steps done, time.time()) at the end of each step
    data_wait_seconds: float = 0.0            # the data wait (status.py's definition), from the final status
    data_waits: int = 0                       # the waits in it
    seconds_to_first_batch: float = 0.0       # from start to the first batch in hand
    seconds_to_first_step: float = 0.0        # from start to the end of the first optimizer step
    wall_seconds: float = 0.0
    train_shards: int | None = None           # train shards streamed (the val shard besides)
    shard_yield: ShardYield | None = None
    checkpoint: str | None = None
    downloader_status: object = None
    signal: str | None = None


def _fingerprint(args, data_id, dataset_shards, tokenizer, model_config, world_size):
    return {"data": data_id, "dataset_shards": dataset_shards, "tokenizer": tokenizer.identity(),
            "vocab_size": tokenizer.get_vocab_size(), "device_batch_size": args.device_batch_size,
            "max_seq_len": args.max_seq_len, "total_batch_size": args.total_batch_size, "world_size": world_size,
            "model": asdict(model_config)}


def train(args):
    """Run training as configured by parse_args(); returns a TrainResult (exit_code 0 when it finished)."""
    import torch
    from .distributed import node_info, setup_ddp
    t_start = time.time()
    result = TrainResult()
    device = pick_device(args.device)
    device_type = device.split(":")[0]
    info = node_info()
    if info.distributed:        # torchrun: a process group (nccl on CUDA, gloo on CPU), a GPU per local rank
        info, ddp_device = setup_ddp(device_type)
        device = str(ddp_device)
    torch.manual_seed(args.seed)
    # No dropout and CPU kernels that are deterministic already, so a resumed CPU run repeats the
    # uninterrupted one (torch.use_deterministic_algorithms would add nothing here but ~3 s of imports).
    stopper = SignalStop()
    try:
        with stopper:
            return _train(args, result, t_start, device, device_type, stopper, info)
    except (StopRun, KeyboardInterrupt):
        # A signal before the training loop (fetching the first shard, say): nothing to save or stop yet.
        result.signal = signal.Signals(stopper.signum or signal.SIGINT).name
        result.exit_code = 128 + (stopper.signum or signal.SIGINT)
        logger.warning("Stopped by %s before training started", result.signal)
        return result
    finally:
        if info.distributed:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()


@dataclass
class _Run:
    """What every phase of a run reads: the flags, this process's place, its device, where its files go."""
    args: argparse.Namespace
    info: object                # distributed.NodeInfo: rank, local rank, world size
    device: str
    device_type: str            # "cuda", "cpu" or "mps"
    stopper: SignalStop
    result: TrainResult         # filled in as the run goes
    t_start: float
    data_dir: Path
    checkpoint_dir: Path


@dataclass
class _Data:
    """Where the shards come from."""
    source: object              # a Source when streaming; None: the shards already in data_dir
    policy: object              # the FetchPolicy every streamed shard is checked by
    data_id: str                # the fingerprint's "data"
    dataset_shards: int | None
    first_shard: object         # () -> the path of train shard 0, fetched if need be
    has_val: bool               # False: --val-files none, no val loss


@dataclass
class _Model:
    """The model and optimizer (resumed when a checkpoint was given) and the geometry of a step."""
    raw_model: object
    model: object               # raw_model, in DistributedDataParallel under torchrun
    optimizer: object
    fingerprint: dict
    tokens_per_step: int
    grad_accum: int
    num_iterations: int
    start_step: int
    loader_state: object        # what the loader resumes from (None: the start of the data)


def _train(args, result, t_start, device, device_type, stopper, info):
    """The run's phases in order: data, tokenizer, model, downloader, the loop."""
    if args.core_metric_every > 0:
        logger.info("--core_metric_every %d: the CORE metric is not part of this trainer; ignored",
                    args.core_metric_every)
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir(args.dataset)
    base = nanochat_base_dir() / "shardstream"
    checkpoint_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else base / "base_checkpoints" / f"d{args.depth}"
    run = _Run(args, info, device, device_type, stopper, result, t_start, data_dir, checkpoint_dir)

    resume = None
    if args.resume_from_step != -1:
        resume = load_checkpoint(checkpoint_dir, args.resume_from_step)
        logger.info("Resuming from %s (step %d)", checkpoint_path(checkpoint_dir, resume["step"]), resume["step"])
    data = _setup_data(run)
    tokenizer, shard_yield = _setup_tokenizer(run, data, base)
    result.shard_yield = shard_yield
    m = _build_model(run, tokenizer, data, resume)
    downloader, train_shards = _setup_downloader(run, data, m, shard_yield, resume)
    _train_loop(run, tokenizer, m, downloader, train_shards, data.has_val)

    result.wall_seconds = time.time() - t_start
    if result.exit_code == 0 and result.losses:
        wait = f", data wait {result.downloader_status.data_wait()}" if result.downloader_status else ""
        logger.info("Done: %d steps, loss %.4f -> %.4f%s, %.1fs in all", result.step - result.start_step,
                    result.losses[0][1], result.losses[-1][1], wait, result.wall_seconds)
    return result


# -----------------------------------------------------------------------------------------------------
# Setup: data, tokenizer, model, downloader

def _setup_data(run):
    """Where the data comes from, and how to get the first shard for the tokenizer."""
    args, data_dir = run.args, run.data_dir
    if args.streaming_mode:
        from .fetch import FetchPolicy, ensure_data_dir, fetch_shard
        from .listing import make_source
        column = text_column(args)
        policy = FetchPolicy(require_checksum=args.require_checksum, verify=args.verify, text_column=column)
        ensure_data_dir(data_dir)           # before make_source: an hf/s3/gs source is listed over the network
        source = make_source(args.source, dataset=args.dataset, dataset_shards=args.dataset_shards,
                             files=getattr(args, "files", None), val_files=getattr(args, "val_files", None),
                             manifest=getattr(args, "manifest", None))
        if args.streaming_total_shards != -1:
            check_train_shards(args.streaming_total_shards, source)     # before shard 0 is fetched
        if source.manifest is not None:
            m = source.manifest
            logger.info("Manifest: %d train + %d val files from %s (digest %s), first %s", len(m.train),
                        len(m.val), source.name, m.digest(), source.path(0))
        if source.val_shard is None:
            logger.info("no val files (--val-files none): val loss is skipped")
        # the identity carries the revision and the manifest's digest: a resume against other files fails
        data_id = source.identity()["source"]
        if column != "text":        # other documents from the same files (kept out for "text": old checkpoints)
            data_id += f"#column-{column}"

        def first_shard():
            logger.info("Fetching %s to train the tokenizer and measure tokens per shard", source.path(0))
            r = fetch_shard(source, 0, data_dir, policy)
            if not r.already_present:       # the event log shows every fetch, this one too (the demo counts them)
                log_event(data_dir, "downloaded", shard=0, size=r.size, seconds=round(r.seconds, 4),
                          attempts=r.attempts, resumed_from=r.resumed_from, checked=r.checked, by="trainer",
                          bytes_on_disk=shard_bytes(data_dir), budget=args.max_cache_bytes, ahead=0, reader_shard=None)
            return r.path
        return _Data(source, policy, data_id, source.dataset_shards, first_shard, source.val_shard is not None)

    on_disk = list_shards(data_dir) if data_dir.is_dir() else []
    if len(on_disk) < 2:
        raise ConfigError(f"{data_dir} holds {len(on_disk)} shard(s); the trainer needs at least 2 (train + "
                          f"val). Download some (`shardstream download -n 4 --data-dir {data_dir}`) or "
                          f"stream them with --streaming_mode=True")
    return _Data(None, None, f"local:{len(on_disk)} shards", None, lambda: data_dir / shard_name(on_disk[0]), True)


def _setup_tokenizer(run, data, base):
    """(tokenizer, ShardYield): local rank 0 of each node makes them, the node's other ranks load them."""
    args, info = run.args, run.info
    data_key = data.data_id if data.source else str(run.data_dir.resolve())
    tokenizer_dir = Path(args.tokenizer_dir) if args.tokenizer_dir else \
        base / f"tokenizer_{_short_hash([data_key, args.vocab_size])}"
    if info.local_rank == 0:    # one process per node fetches shard 0, trains the tokenizer, measures the shard
        tokenizer, shard_yield = run.stopper.waiting(prepare_tokenizer, tokenizer_dir, args.vocab_size,
                                                     data.first_shard, data_key, args.max_seq_len,
                                                     args.tokenizer_threads, text_column(args))
    if info.distributed:
        import torch.distributed as dist
        dist.barrier()          # main thread: every node's local rank 0 has saved the tokenizer and shard yield
    if info.local_rank != 0:
        def not_prepared():
            raise ConfigError(f"rank {info.rank}: local rank 0 prepared the tokenizer in {tokenizer_dir}, but this "
                              f"rank finds it incomplete there: every rank of a node must see the same "
                              f"--tokenizer_dir (a node-local or shared disk)")
        tokenizer, shard_yield = prepare_tokenizer(tokenizer_dir, args.vocab_size, not_prepared, data_key,
                                                   args.max_seq_len, args.tokenizer_threads, text_column(args))
    return tokenizer, shard_yield


def _build_model(run, tokenizer, data, resume):
    """The model and its optimizer, from the checkpoint `resume` when there is one (checked against this run)."""
    import torch
    from .gpt import GPT, config_for_depth
    args, info, result = run.args, run.info, run.result
    model_config = config_for_depth(args.depth, args.max_seq_len, tokenizer.get_vocab_size())
    raw_model = GPT(model_config).to(run.device)
    optimizer = raw_model.make_optimizer(args.lr, weight_decay=args.weight_decay)
    tokens_per_step = args.total_batch_size
    micro_tokens = args.device_batch_size * args.max_seq_len * info.world_size
    if tokens_per_step % micro_tokens:      # parse_args checked it against WORLD_SIZE; train() may get args directly
        raise ConfigError(f"--total_batch_size {tokens_per_step} must be a multiple of device_batch_size*"
                          f"max_seq_len*world size = {micro_tokens}")
    grad_accum = tokens_per_step // micro_tokens
    num_iterations = args.num_iterations
    if num_iterations == -1:
        num_iterations = max(1, round(args.target_param_data_ratio * raw_model.num_params() / tokens_per_step))
    result.num_iterations = num_iterations
    fingerprint = _fingerprint(args, data.data_id, data.dataset_shards, tokenizer, model_config, info.world_size)
    ranks = f" x {info.world_size} ranks" if info.distributed else ""
    logger.info("Model: depth %d, width %d, %d heads, vocab %d, %s parameters; %s tokens per step "
                "(%d x %d%s x %d accumulation), %d steps, device %s", args.depth, model_config.n_embd,
                model_config.n_head, model_config.vocab_size, f"{raw_model.num_params():,}", f"{tokens_per_step:,}",
                args.device_batch_size, args.max_seq_len, ranks, grad_accum, num_iterations, run.device)

    start_step, loader_state = 0, None
    if resume is not None:
        check_resume(resume["fingerprint"], fingerprint, resume["step"])
        saved_world = resume["fingerprint"].get("world_size", 1)
        if saved_world != info.world_size:
            logger.warning("Resuming a %d-rank checkpoint with %d rank(s): the data resumes without reading a row "
                           "group twice or skipping one, but not batch for batch (docs/DISTRIBUTED.md)",
                           saved_world, info.world_size)
        raw_model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        start_step, loader_state = resume["step"], resume["loader_state"]
    result.start_step = result.step = start_step
    model = raw_model
    if info.distributed:        # after the resume's weights: DDP broadcasts rank 0's parameters anyway
        from torch.nn.parallel import DistributedDataParallel
        model = DistributedDataParallel(raw_model, device_ids=[torch.device(run.device).index]
                                        if run.device_type == "cuda" else None)
    return _Model(raw_model, model, optimizer, fingerprint, tokens_per_step, grad_accum, num_iterations,
                  start_step, loader_state)


def _setup_downloader(run, data, m, shard_yield, resume):
    """(downloader, train shards) for a streaming run, (None, None) otherwise. The downloader is not started."""
    if data.source is None:
        return None, None
    args, info, source = run.args, run.info, data.source
    # Train shards, the val shard besides: what SHARDSTREAM_TOTAL_SHARDS and StreamingDownloader(total_shards=) count.
    train_shards = args.streaming_total_shards
    saved = None if resume is None else checkpoint_train_shards(resume)
    if train_shards == -1 and saved:
        train_shards = saved
    elif train_shards == -1:
        tokens_needed = m.num_iterations * m.tokens_per_step
        sizes = train_sizes(source)
        train_shards = shards_needed(tokens_needed, shard_yield, source.num_train_shards,
                                     read_ahead_docs=loader_read_ahead_docs() * info.world_size, sizes=sizes)
        each = "in shard 0, the others counted by their sizes" if sizes else "each"
        val = "the val shard comes besides" if len(source.val_shards) == 1 else \
            f"{len(source.val_shards)} val shards besides" if source.val_shards else "no val shards"
        logger.info("Streaming mode: calculated %d of %d train shards needed for %s tokens (~%s tokens %s; %s)",
                    train_shards, source.num_train_shards, f"{tokens_needed:,}", f"{shard_yield.trained_tokens:,}",
                    each, val)
    if saved is not None and saved != train_shards:
        raise StateMismatchError(f"cannot resume from step {resume['step']}: the checkpoint streamed "
                                 f"{saved} train shards, this run --streaming_total_shards {train_shards} "
                                 f"(leave it at -1 to take the checkpoint's)")
    check_train_shards(train_shards, source)
    run.result.train_shards = train_shards
    # One process: a StreamingDownloader. torchrun: the node's one downloader on local rank 0, a reader
    # of it (through torchrun's store) on every other local rank.
    from .distributed import make_node_downloader
    downloader = make_node_downloader(
        partition=args.streaming_partition, info=info, total_shards=train_shards,
        buffer_size=args.streaming_buffer_size, data_dir=run.data_dir, source=source,
        max_cache_bytes=args.max_cache_bytes, retain=args.streaming_retain, initial_buffer=0 if resume else 1,
        prefetch="auto" if args.streaming_prefetch == "auto" else None, fetch_policy=data.policy,
        timeout=getattr(args, "dist_timeout", None), text_column=text_column(args))
    return downloader, train_shards


# -----------------------------------------------------------------------------------------------------
# The training loop

def _train_loop(run, tokenizer, m, downloader, train_shards, has_val=True):
    """nanochat's loop: the first batch before step 0, then per step: val loss, stop, checkpoint, one optimizer
    step that fetches the next batch as it trains. A signal saves the whole steps; the downloader stops at the end."""
    import torch
    import torch.distributed as dist
    from .loader import tokenizing_distributed_data_loader_with_state_bos_bestfit
    args, info, stopper, result = run.args, run.info, run.stopper, run.result
    hash_log = None
    if args.batch_hash_log:
        hash_log = open(args.batch_hash_log + (f".rank{info.rank}" if info.rank else ""), "a", buffering=1)
    autocast = (torch.autocast(device_type="cuda", dtype=torch.bfloat16) if run.device_type == "cuda"
                else contextlib.nullcontext())
    waiting = stopper.waiting
    if info.distributed:
        # Inside the loop a rank must not stop alone between collectives (the others would hang in the
        # gradient all-reduce): a signal is recorded and the ranks agree on it at the next step boundary.
        def loop_waiting(fn, *a):
            return fn(*a)
    else:
        loop_waiting = waiting
    eval_tokens = args.eval_tokens if args.eval_tokens != -1 else 4 * args.device_batch_size * args.max_seq_len
    eval_batches = 0 if eval_tokens == 0 else max(1, eval_tokens // (args.device_batch_size * args.max_seq_len))
    if not has_val:             # --val-files none (said once at start)
        eval_batches = 0

    step, loader_state = m.start_step, m.loader_state
    orderly = False             # every rank ends here together (finished, or a stop they agreed on)
    # What rank 0 says about the stream: the downloader's status with the shard in training and a wait in progress.
    talk = downloader is not None and info.rank == 0
    events, trained = None, None    # the event log; the shard in training (the loader state's pq_idx)

    def stream_status():
        return _stream_status(downloader, run.data_dir, trained)

    def step_line_wait():
        return f" | data wait: {stream_status().data_wait()}" if talk else ""

    watch = WaitWatch(lambda blocked: f"step {step:05d}/{m.num_iterations:05d} | waiting for data: {blocked:.1f}s "
                                      f"so far{step_line_wait()}") if talk else None

    def get(loader, wait=loop_waiting):     # the next batch; a long wait shows in the log while it lasts
        return wait(next, loader) if watch is None else watch.waiting(wait, next, loader)

    try:
        train_loader = None

        def next_batch(wait=loop_waiting):
            nonlocal trained
            batch = get(train_loader, wait)
            shard = _training_shard(downloader, batch[2]) if events is not None else None
            if shard is not None and shard != trained:      # an event `shardstream status` shows
                from .status import event_fields
                trained = shard
                events.write("training_shard", shard=shard, step=step, **event_fields(downloader.get_status()))
            return batch

        step_state = None
        try:
            if downloader is not None:
                waiting(downloader.start)       # blocks until the first shard is verified
            if talk:
                from .status import EventLog
                events = EventLog(run.data_dir)
            train_loader = tokenizing_distributed_data_loader_with_state_bos_bestfit(
                tokenizer, args.device_batch_size, args.max_seq_len, "train",
                tokenizer_threads=args.tokenizer_threads, tokenizer_batch_size=LOADER_BATCH_DOCS,
                buffer_size=LOADER_BUFFER_DOCS, device=run.device, resume_state_dict=loader_state,
                streaming_downloader=downloader, data_dir=None if downloader else run.data_dir,
                share_state=getattr(args, "share_state", True), dist_timeout=getattr(args, "dist_timeout", None))
            x, y, loader_state = next_batch(waiting)
            result.seconds_to_first_batch = time.time() - run.t_start
            logger.info("First batch ready %.1fs after start%s", result.seconds_to_first_batch,
                        f" (data wait so far: {stream_status().data_wait()})" if talk else "")
            while True:
                last_step = step >= m.num_iterations
                if eval_batches and (last_step or (args.eval_every > 0 and step % args.eval_every == 0)):
                    val_loss = _evaluate(run, tokenizer, m.raw_model, downloader, eval_batches, autocast, get)
                    result.val_losses.append((step, val_loss))
                    logger.info("Step %05d | Validation loss: %.6f", step, val_loss)
                if _agree_on_stop(run):
                    orderly = True      # at a step boundary, on every rank together
                    raise StopRun
                if last_step or (args.save_every > 0 and step > m.start_step and step % args.save_every == 0):
                    _checkpoint(run, m, step, loader_state, train_shards, downloader)
                if last_step:
                    orderly = True
                    break
                step_state = loader_state
                t0 = time.time()
                (x, y, loader_state), loss_sum, lrm = _train_step(run, m, step, (x, y, loader_state), next_batch,
                                                                  autocast, hash_log)
                dt = time.time() - t0
                step += 1
                step_state = None
                result.step = step
                _log_step(run, m, step, _mean_over_ranks(run, loss_sum / m.grad_accum), lrm, dt, step_line_wait)
                # after the first step, every --status_every steps, and "final" at the end (_stop_downloader)
                if talk and (step % args.status_every == 0 or step == m.start_step + 1):
                    logger.info("[Streaming] %s", stream_status().line())
        except StopRun:
            # Signalled: the model holds `step` whole steps; the batch step `step` trains on first came
            # with step_state (mid-step) or loader_state (at a boundary).
            _stopped(run, m, step, step_state if step_state is not None else loader_state, train_shards, downloader)
        finally:
            if train_loader is not None:
                train_loader.close()
    except KeyboardInterrupt:
        result.exit_code = 130
        result.signal = "SIGINT"
        logger.warning("Interrupted at step %d", step)
    finally:
        if watch is not None:
            watch.close()
        if hash_log:
            hash_log.close()
        if events is not None:
            events.close()
        if info.distributed and orderly:
            dist.barrier()      # no rank stops the node's downloader while another still reads through it
        if downloader is not None:
            _stop_downloader(run, downloader, trained)


def _stopped(run, m, step, state, train_shards, downloader):
    """A signal ended the run after `step` whole steps: drop a torn step's grads, save when --save_every is set."""
    result, signum = run.result, run.stopper.signum
    m.optimizer.zero_grad(set_to_none=True)
    result.signal = signal.Signals(signum).name
    result.exit_code = 128 + signum
    if run.args.save_every > 0 and state is not None:
        _checkpoint(run, m, step, state, train_shards, downloader)
    logger.warning("Stopped by %s at step %d%s", result.signal, step,
                   "" if run.args.save_every > 0 else " (no checkpoint: --save_every is not set)")


def _train_step(run, m, step, batch, next_batch, autocast, hash_log):
    """One optimizer step over grad_accum micro-batches, fetching the next batch as each one trains.
    Returns the batch after them, the summed loss and the LR multiplier."""
    import torch
    args = run.args
    x, y, state = batch
    loss_sum = 0.0
    for micro in range(m.grad_accum):
        # DDP all-reduces the gradients after the last micro-batch's backward only
        sync = m.model.no_sync() if run.info.distributed and micro < m.grad_accum - 1 else contextlib.nullcontext()
        with sync:
            with autocast:
                loss = m.model(x, y)
            (loss / m.grad_accum).backward()
        loss_sum += loss.item()
        if hash_log:
            hash_log.write(f"{step} {micro} {batch_digest(x, y)}\n")
        x, y, state = next_batch()
    lrm = lr_multiplier(step, m.num_iterations, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
    for group in m.optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lrm
    if args.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(m.model.parameters(), args.grad_clip)
    m.optimizer.step()
    m.optimizer.zero_grad(set_to_none=True)
    if run.device_type == "cuda":
        torch.cuda.synchronize()
    return (x, y, state), loss_sum, lrm


def _log_step(run, m, step, train_loss, lrm, dt, step_line_wait):
    """Record the step that made `step` steps done in the result, and log its step line when it is due."""
    args, result = run.args, run.result
    result.losses.append((step - 1, train_loss))
    result.step_times.append((step, time.time()))
    if step == m.start_step + 1:
        result.seconds_to_first_step = time.time() - run.t_start
    if step % args.log_every == 0 or step in (m.start_step + 1, m.num_iterations):
        logger.info("step %05d/%05d (%.2f%%) | loss: %.6f | lr: %.2e | dt: %.2fms | tok/sec: %s%s | "
                    "total time: %.2fm", step - 1, m.num_iterations, 100 * step / m.num_iterations, train_loss,
                    args.lr * lrm, dt * 1000, f"{int(m.tokens_per_step / max(dt, 1e-9)):,}",
                    step_line_wait(), (time.time() - run.t_start) / 60)


def _evaluate(run, tokenizer, raw_model, downloader, batches, autocast, get):
    """The val loss over `batches` micro-batches of the val shard, averaged over the ranks."""
    import torch
    from .loader import tokenizing_distributed_data_loader_bos_bestfit
    args = run.args
    loader = tokenizing_distributed_data_loader_bos_bestfit(
        tokenizer, args.device_batch_size, args.max_seq_len, "val", tokenizer_threads=args.tokenizer_threads,
        tokenizer_batch_size=LOADER_BATCH_DOCS, buffer_size=LOADER_BUFFER_DOCS, device=run.device,
        streaming_downloader=downloader, data_dir=None if downloader else run.data_dir)
    raw_model.eval()
    total = 0.0
    try:
        with torch.no_grad(), autocast:
            for _ in range(batches):
                x, y = get(loader)
                total += raw_model(x, y).item()
    finally:
        loader.close()
        raw_model.train()
    return _mean_over_ranks(run, total / batches)


def _mean_over_ranks(run, value):
    """value averaged over the ranks (an all_reduce in the main thread; every rank calls it)."""
    if not run.info.distributed:
        return value
    import torch
    import torch.distributed as dist
    t = torch.tensor([value], dtype=torch.float64, device=run.device)
    dist.all_reduce(t)
    return t.item() / run.info.world_size


def _agree_on_stop(run):
    """Whether to stop at this step boundary. Under torchrun the answer comes from the all_reduce
    alone (a signal landing after it counts at the next boundary), so every rank gets the same one."""
    stopper = run.stopper
    if not run.info.distributed:
        return stopper.requested
    import torch
    import torch.distributed as dist
    t = torch.tensor([stopper.signum or 0], dtype=torch.int64, device=run.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    agreed = int(t.item())
    if agreed and stopper.signum is None:
        stopper.signum = agreed
        logger.warning("Another rank received %s: stopping at this step boundary", signal.Signals(agreed).name)
    return bool(agreed)


def _checkpoint(run, m, step, state, train_shards, downloader):
    """Save the model and optimizer after `step` steps with `state`, the loader state step's batch came with."""
    if run.info.rank != 0:      # rank 0's loader state carries every rank's cursor: one file resumes them all
        return
    payload = {"format": CHECKPOINT_FORMAT, "step": step, "model": m.raw_model.state_dict(),
               "optimizer": m.optimizer.state_dict(), "loader_state": state, "fingerprint": m.fingerprint,
               "train_shards": train_shards, "num_iterations": m.num_iterations, "config": vars(run.args),
               "downloader": downloader.get_status().to_dict() if downloader else None}
    path = save_checkpoint(run.checkpoint_dir, step, payload)
    run.result.checkpoint = str(path)
    logger.info("Saved checkpoint %s", path)


# -----------------------------------------------------------------------------------------------------
# What rank 0 says about the stream

def _stream_status(downloader, data_dir, trained):
    """The downloader's status naming the shard in training (its current_shard is the loader's read-ahead)."""
    from .status import with_events
    from .streaming_env import with_training
    st = downloader.get_status()
    if trained is not None:
        st = with_training(st, trained, downloader.source)
    if st.current_shard is not None and st.current_shard not in st.cached:    # the reader may be waiting
        st = with_events(st, data_dir)
    return st


def _training_shard(downloader, state):
    """The shard a loader state's pq_idx points at (None when it names none)."""
    if not isinstance(state, dict) or not isinstance(state.get("pq_idx"), int):
        return None
    order = downloader.plan.order
    return order[state["pq_idx"]] if 0 <= state["pq_idx"] < len(order) else None


def _stop_downloader(run, downloader, trained):
    """Stop the downloader's threads; its last status, with the shard in training, goes into the result."""
    result = run.result
    logger.info("Stopping streaming downloader...")
    try:
        last = downloader.get_status()
    finally:
        downloader.stop()
    try:                # after the stop: the figures of the status.json it left, which `shardstream status` shows
        last = downloader.get_status()
    except ShardStreamError:
        pass
    from .streaming_env import with_training
    result.downloader_status = with_training(last, trained, downloader.source) if trained is not None else last
    result.data_wait_seconds = result.downloader_status.data_wait_seconds()
    result.data_waits = result.downloader_status.waits
    if run.info.rank == 0:
        logger.info("[Streaming] final: %s", result.downloader_status.line())


def main(argv=None):
    """Entry point of `python -m scripts.base_train`; returns the exit code."""
    if not logging.getLogger().handlers:
        from .distributed import node_info
        try:
            rank = node_info().rank
        except ConfigError:
            rank = 0            # parse_args/train report the bad environment
        # Under torchrun rank 0 logs; the other ranks only warnings and errors, naming their rank.
        logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stdout,
                            format="%(message)s" if rank == 0 else f"[rank {rank}] %(message)s")
    logging.getLogger("rustbpe").setLevel(logging.WARNING)     # its per-merge progress lines
    logging.getLogger("httpx2").setLevel(logging.WARNING)      # a line per Hub API request (huggingface_hub)
    from .settings import warn_unknown
    warn_unknown(log=logger)            # a typo in a SHARDSTREAM_* name would otherwise be ignored silently
    try:
        args = parse_args(argv)
        return train(args).exit_code
    except (ShardStreamError, ConfigError) as e:
        logger.error("error: %s", e)
        return 2 if isinstance(e, (ConfigError, StateMismatchError)) else 1
