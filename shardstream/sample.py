"""Offline sample shards in nanochat's layout, filled with English-like text.

    make_sample("/tmp/sample", shards=6, chars_per_shard=2_000_000, seed=0)
    shardstream make-sample /tmp/sample --shards 6 --chars-per-shard 2000000 --seed 0

Each shard_XXXXX.parquet has one string column `text`, row groups of 1,024 documents (so the row count is
a multiple of 1,024), zstd level 3, no dictionary, no statistics: the layout of nanochat's climbmix and
fineweb-edu shards, so everything downstream (loader, tokenizer, verify) sees the real thing in small.

The text is made offline from a built-in vocabulary of a few hundred common English words sorted by part
of speech and a few dozen sentence templates, so it reads as plausible (if dull) English: real words in a
grammatical order, sentences grouped in paragraphs, documents whose lengths are lognormal (median ~3,000
characters when there is room for it). Every shard is deterministic for (seed, shard index), and shards
differ from each other and across seeds. Documents are sized so a shard holds about `chars_per_shard`
characters; when that is small, documents get short (at least one sentence each).
Generation is vectorized with numpy: ~100 MB of text takes a few seconds.

`make_fineweb_sample(dir)` / `make-sample DIR --layout fineweb` writes a tree shaped like FineWeb's on the
Hub instead, for sources that are not nanochat's layout (`--files GLOB`, manifest.py):

    README.md
    data/CC-MAIN-2024-10/000_00000.parquet  000_00001.parquet
    data/CC-MAIN-2024-18/000_00000.parquet
    sample/10BT/000_00000.parquet .. 000_00003.parquet

each parquet with FineWeb's columns `text`, `id`, `url`, `dump` (so readers must pick `text`, not the
first column), small by default (FINEWEB_CHARS_PER_FILE), deterministic for (seed, path).
"""
import argparse
import hashlib
import logging
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .checksums import CHECKSUM_FILE, write_sha256sums
from .errors import ConfigError
from .shards import shard_name

logger = logging.getLogger(__name__)

DOCS_PER_ROW_GROUP = 1024
MEDIAN_DOC_CHARS = 3000            # when chars_per_shard leaves room for it
DOC_LENGTH_SIGMA = 0.8             # lognormal spread of document lengths
PARAGRAPH_BREAK_P = 0.2            # chance that a sentence ends its paragraph

# --- the vocabulary, by part of speech ---------------------------------------

DETERMINERS = "the the the the the the this that every each our their his her one no another".split()
ADJECTIVES = """old new small large quiet loud bright dark early late simple strange careful gentle
    heavy light warm cold young ancient green blue red golden silver narrow wide deep short long quick
    slow happy sad proud tired busy empty crowded famous hidden local distant modern rural common rare
    useful difficult easy honest curious patient friendly clever serious calm wild broken clean dusty
    fresh sharp soft strong weak rich poor familiar foreign important public private final main""".split()
NOUNS = """man woman child teacher student farmer doctor writer painter driver captain soldier merchant
    king queen friend neighbor stranger family village city river mountain forest garden field road
    bridge house door window table chair book letter story song picture map clock lamp key box bag
    boat train car horse dog cat bird tree flower stone wall tower market school church library office
    kitchen room street island valley lake shore hill harbor machine engine wheel tool rope basket coin
    bottle cup bread apple meal fire storm rain wind snow morning evening night winter summer season
    idea plan question answer problem reason result method lesson report journey voice memory dream
    promise secret message government company council museum festival camera computer""".split()
NAMES = """Anna Maria John Peter Sarah Thomas Emma James Laura David Elena Henry Alice Samuel Clara
    Oliver Grace Daniel Rose Victor Helen Martin Julia Arthur""".split()
PLACES = """London Paris Boston Lisbon Vienna Madrid Dublin Prague Chicago Oslo Naples Geneva Denver
    Berlin Quebec Seville""".split()
# (base, past) of transitive verbs, and intransitive verbs
VERBS_T = [tuple(v.split("/")) for v in """open/opened close/closed find/found lose/lost build/built
    carry/carried sell/sold buy/bought paint/painted read/read write/wrote watch/watched follow/followed
    visit/visited clean/cleaned fix/fixed move/moved hold/held bring/brought take/took leave/left
    answer/answered study/studied explain/explained describe/described remember/remembered discover/discovered
    protect/protected prepare/prepared repair/repaired share/shared teach/taught meet/met call/called
    count/counted measure/measured cook/cooked plant/planted wash/washed check/checked change/changed
    improve/improved finish/finished start/started test/tested design/designed order/ordered
    """.split()]
VERBS_I = [tuple(v.split("/")) for v in """arrive/arrived wait/waited sleep/slept laugh/laughed travel/traveled
    work/worked rest/rested listen/listened smile/smiled return/returned walk/walked run/ran sing/sang
    speak/spoke stay/stayed fall/fell grow/grew shine/shone rise/rose disappear/disappeared
    """.split()]
ADVERBS = """slowly quickly quietly carefully suddenly finally often rarely always never gently happily
    sadly early late again together alone soon there here today yesterday outside inside""".split()
PREPOSITIONS = """in on near behind under over beside across through along into from with without
    before after around toward beyond inside""".split()
TIME_PHRASES = """after the war|before the storm|in the morning|at night|during the winter|in the spring
    |after dinner|before sunrise|on the first day|by the end of the week|for many years|a long time ago
    |later that evening|in the summer|after the meeting""".replace("\n", "").split("|")
CONJUNCTIONS = "because although while when until since after before".split()
AUX = "could would will might should must can".split()

# Slots: D det, A adj, N noun, M name, P place, T transitive past, B transitive base, I intransitive past,
# J intransitive base, R adverb, O preposition, W time phrase, C conjunction, X auxiliary, Y year.
TEMPLATES = """D A N T D N .
D N T D A N O D N .
M T D N O D A N .
O D A N , D N T D N .
D N I R .
M I O P R .
W , M T D N .
D A N X B D N .
D N T D N and T D A N .
D N I O D N C D N T D N .
C D N I , D A N T D N .
M and M T D A N O P .
In Y , D N O P T D N .
D N was A , and D N I R .
D N X J O D N , but D N X J R .
there was D A N O D N .
M said that D N T D N .
why did D N B D N ?
it was D A N , and M I R .
D A N T M O D N .
M X B D N every day .
D N and D N I O D A N .
W , D A N I O P .
many people T D N , but M T D A N .""".split("\n")
SLOT_WORDS = {
    "D": DETERMINERS, "A": ADJECTIVES, "N": NOUNS, "M": NAMES, "P": PLACES,
    "T": [p for _, p in VERBS_T], "B": [b for b, _ in VERBS_T],
    "I": [p for _, p in VERBS_I], "J": [b for b, _ in VERBS_I],
    "R": ADVERBS, "O": PREPOSITIONS, "W": TIME_PHRASES, "C": CONJUNCTIONS, "X": AUX,
    "Y": [str(y) for y in range(1820, 2021)],
}


def vocabulary():
    """Every word the generator can emit, lowercased (for tests and curious users)."""
    words = set()
    for lst in SLOT_WORDS.values():
        for phrase in lst:
            words.update(w.lower() for w in phrase.split())
    for t in TEMPLATES:
        words.update(w.lower() for w in t.split() if not (len(w) == 1 and w.isupper()) and w.isalpha())
    return words


def _compile_templates():
    """Each template -> (format string, slot letters). A sentence starts with a capital letter; when the
    first slot is a word list we draw from a capitalized copy of it."""
    compiled = []
    for t in TEMPLATES:
        fmt, slots = [], []
        for i, tok in enumerate(t.split()):
            if len(tok) == 1 and tok in SLOT_WORDS:
                slots.append(tok + ("^" if i == 0 else ""))
                piece = "{}"
            else:
                piece = tok.capitalize() if i == 0 else tok
            if piece in (".", ",", "?") and fmt:
                fmt[-1] += piece
            else:
                fmt.append(piece)
        compiled.append((" ".join(fmt), slots))
    return compiled


_TEMPLATES = _compile_templates()
_WORDS = {k: np.array(v, dtype=object) for k, v in SLOT_WORDS.items()}
_WORDS.update({k + "^": np.array([w[0].upper() + w[1:] for w in v], dtype=object) for k, v in SLOT_WORDS.items()})


def _sentences(rng, n):
    """n random sentences as a list of str (template chosen per sentence, slots filled per template)."""
    which = rng.integers(len(_TEMPLATES), size=n)
    out = np.empty(n, dtype=object)
    for t, (fmt, slots) in enumerate(_TEMPLATES):
        rows = np.flatnonzero(which == t)
        if not len(rows):
            continue
        cols = [_WORDS[s][rng.integers(len(_WORDS[s]), size=len(rows))] for s in slots]
        out[rows] = [fmt.format(*ws) for ws in zip(*cols)]
    return out.tolist()


def make_documents(n_docs, chars, seed):
    """n_docs English-like documents of about `chars` characters in total, deterministic for seed
    (an int or a sequence of ints). Lengths are lognormal; each doc has at least one sentence."""
    rng = np.random.default_rng(seed)
    mean = chars / n_docs
    # lognormal with the asked mean: median = mean / exp(sigma^2 / 2)
    mu = np.log(max(mean, 1.0)) - DOC_LENGTH_SIGMA ** 2 / 2
    targets = rng.lognormal(mu, DOC_LENGTH_SIGMA, size=n_docs)
    targets *= chars / targets.sum()
    sentences, lengths = [], []
    total = 0
    while total < chars or len(sentences) < n_docs:
        batch = _sentences(rng, max(n_docs - len(sentences), int((chars - total) / 45) + 64))
        sentences += batch
        blen = np.fromiter(map(len, batch), dtype=np.int64, count=len(batch)) + 1
        lengths.append(blen)
        total += int(blen.sum())
    cum = np.cumsum(np.concatenate(lengths))
    ends = np.searchsorted(cum, np.cumsum(targets)) + 1            # doc k ends before sentence ends[k]
    ends = np.maximum(ends, np.arange(1, n_docs + 1))               # at least one sentence each
    ends = np.maximum.accumulate(ends)
    ends[-1] = min(ends[-1], len(sentences))
    for k in range(n_docs - 2, -1, -1):                             # leave room for the docs after it
        ends[k] = min(ends[k], ends[k + 1] - 1)
    breaks = rng.random(len(sentences)) < PARAGRAPH_BREAK_P
    parts = [s + ("\n\n" if b else " ") for s, b in zip(sentences, breaks.tolist())]
    docs, start = [], 0
    for end in ends.tolist():
        docs.append("".join(parts[start:end]).rstrip())
        start = end
    return docs


def write_shard(path, docs, docs_per_row_group=DOCS_PER_ROW_GROUP):
    """Write docs as a nanochat-layout parquet file, atomically (tmp file + rename)."""
    path = Path(path)
    table = pa.table({"text": pa.array(docs, type=pa.string())})
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        pq.write_table(table, tmp, row_group_size=docs_per_row_group, compression="zstd",
                       compression_level=3, use_dictionary=False, write_statistics=False)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def make_sample(directory, shards, chars_per_shard, seed=0, docs_per_row_group=DOCS_PER_ROW_GROUP, *,
                row_groups=None):
    """Write shard_00000.parquet .. shard_{shards-1}.parquet into directory; return their paths.

    Each shard holds `row_groups` row groups of docs_per_row_group documents (by default as many as
    give documents a median of ~3,000 characters, at least one) and about chars_per_shard characters
    of text. Shard i is deterministic for (seed, i)."""
    if not isinstance(shards, int) or isinstance(shards, bool) or shards < 1:
        raise ConfigError(f"shards must be an int >= 1, got {shards!r}")
    if not isinstance(chars_per_shard, int) or chars_per_shard < 1:
        raise ConfigError(f"chars_per_shard must be an int >= 1, got {chars_per_shard!r}")
    if not isinstance(docs_per_row_group, int) or docs_per_row_group < 1:
        raise ConfigError(f"docs_per_row_group must be an int >= 1, got {docs_per_row_group!r}")
    if row_groups is not None and (not isinstance(row_groups, int) or row_groups < 1):
        raise ConfigError(f"row_groups must be an int >= 1 or None (automatic), got {row_groups!r}")
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create sample directory {str(directory)!r}: {e}") from e
    mean_doc = MEDIAN_DOC_CHARS * np.exp(DOC_LENGTH_SIGMA ** 2 / 2)
    groups = row_groups or max(1, round(chars_per_shard / (mean_doc * docs_per_row_group)))
    n_docs = groups * docs_per_row_group
    paths = []
    for i in range(shards):
        docs = make_documents(n_docs, chars_per_shard, seed=[seed, i])
        paths.append(write_shard(directory / shard_name(i), docs, docs_per_row_group))
        logger.debug("wrote %s: %d docs, %d chars", paths[-1], len(docs), sum(map(len, docs)))
    return paths


LAYOUTS = ("nanochat", "fineweb")
FINEWEB_FILES = ("data/CC-MAIN-2024-10/000_00000.parquet", "data/CC-MAIN-2024-10/000_00001.parquet",
                 "data/CC-MAIN-2024-18/000_00000.parquet",
                 "sample/10BT/000_00000.parquet", "sample/10BT/000_00001.parquet",
                 "sample/10BT/000_00002.parquet", "sample/10BT/000_00003.parquet")
FINEWEB_CHARS_PER_FILE = 200_000
FINEWEB_README = """---
license: odc-by
configs:
- config_name: default
  data_files: data/*/*
- config_name: sample-10BT
  data_files: sample/10BT/*
---
# FineWeb-like sample (shardstream make-sample --layout fineweb)

Offline English-like text in FineWeb's layout: one folder per crawl under data/, a sample under
sample/10BT/, columns text, id, url, dump. Not real web text.
"""


def write_fineweb_file(path, docs, dump, docs_per_row_group=DOCS_PER_ROW_GROUP):
    """docs as a FineWeb-like parquet file (text, id, url, dump), atomically (tmp file + rename)."""
    path = Path(path)
    digest = hashlib.sha256(str(path.name).encode()).hexdigest()[:8]
    n = len(docs)
    table = pa.table({
        "text": pa.array(docs, type=pa.string()),
        "id": pa.array([f"<urn:uuid:{digest}-{i:08d}>" for i in range(n)], type=pa.string()),
        "url": pa.array([f"https://example.org/{dump.lower()}/{digest}/{i}" for i in range(n)], type=pa.string()),
        "dump": pa.array([dump] * n, type=pa.string()),
    })
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        pq.write_table(table, tmp, row_group_size=docs_per_row_group, compression="zstd", compression_level=3)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def make_fineweb_sample(directory, chars_per_file=FINEWEB_CHARS_PER_FILE, seed=0, docs_per_row_group=64):
    """Write the FineWeb-like tree (module docstring) into directory; return the parquet paths, sorted.
    File k of FINEWEB_FILES is deterministic for (seed, k); a sample/10BT file's dump is its own crawl's name."""
    if not isinstance(chars_per_file, int) or isinstance(chars_per_file, bool) or chars_per_file < 1:
        raise ConfigError(f"chars_per_file must be an int >= 1, got {chars_per_file!r}")
    directory = Path(directory)
    paths = []
    try:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "README.md").write_text(FINEWEB_README, encoding="utf-8")
        for k, rel in enumerate(FINEWEB_FILES):
            path = directory / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            dump = rel.split("/")[1] if rel.startswith("data/") else ("CC-MAIN-2024-10", "CC-MAIN-2024-18")[k % 2]
            n_docs = max(1, round(chars_per_file / 1500))
            docs = make_documents(n_docs, chars_per_file, seed=[seed, 1000 + k])
            paths.append(write_fineweb_file(path, docs, dump, docs_per_row_group))
    except OSError as e:
        raise ConfigError(f"cannot write the sample into {str(directory)!r}: {e}") from e
    return sorted(paths)


def cli(argv):
    p = argparse.ArgumentParser(prog="shardstream make-sample",
                                description="Write offline sample shards of English-like text in nanochat's layout.")
    p.add_argument("directory", help="where to write shard_XXXXX.parquet files")
    p.add_argument("--shards", type=int, default=4, help="how many shards (default 4; the last is val)")
    p.add_argument("--chars-per-shard", type=int, default=10_000_000,
                   help="characters of text per shard (default 10,000,000; nanochat's are ~250,000,000)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--layout", choices=LAYOUTS, default="nanochat",
                   help="nanochat: shard_XXXXX.parquet with a text column (default); fineweb: FineWeb's tree "
                        "(data/CC-MAIN-*/000_0000N.parquet, sample/10BT/..., README.md; columns text, id, url, "
                        "dump), small files, for --files GLOB sources")
    p.add_argument("--checksums", action="store_true",
                   help=f"also write {CHECKSUM_FILE} (sha256sum's format), which fetch verifies shards against")
    args = p.parse_args(argv)
    args.chars_per_shard_given = any(a == "--chars-per-shard" or a.startswith("--chars-per-shard=") for a in argv)
    try:
        if args.layout == "fineweb":
            if args.checksums:      # SHA256SUMS names files by base name: the tree's names repeat across folders
                raise ConfigError("--checksums is for the nanochat layout (SHA256SUMS names files by base name, "
                                  "which repeat in the fineweb tree); the Hub-like server gives their sha256")
            chars = args.chars_per_shard if args.chars_per_shard_given else FINEWEB_CHARS_PER_FILE
            paths = make_fineweb_sample(args.directory, chars, seed=args.seed)
        else:
            paths = make_sample(args.directory, args.shards, args.chars_per_shard, seed=args.seed)
        if args.checksums:
            print(f"wrote {write_sha256sums(args.directory, paths)}")
    except ConfigError as e:
        print(f"shardstream make-sample: {e}", file=sys.stderr)
        return 2
    total = 0
    for path in paths:
        size = path.stat().st_size
        total += size
        md = pq.ParquetFile(path).metadata
        print(f"{path}  {md.num_rows:,} docs  {md.num_row_groups} row groups  {size / 1e6:.1f} MB")
    print(f"wrote {len(paths)} shards, {total / 1e6:.1f} MB in all, to {args.directory}")
    return 0
