"""The tokenizer: a byte-level BPE trained offline with rustbpe, encoded with tiktoken (nanochat's stack).

A pretrained vocab cannot be downloaded here, so everything trains locally from sample text in seconds:

    tok = train_tokenizer_from_shards(paths, vocab_size=1024)    # or train_tokenizer(texts, vocab_size)
    tok.save(dir); tok = Tokenizer.load(dir)
    ids = tok.encode(["doc one", "doc two"], prepend=tok.get_bos_token_id(), num_threads=4)
    arrays = tok.encode_arrays(["doc one", "doc two"], num_threads=4)   # the same ids, numpy uint32

The interface is nanochat's (get_bos_token_id, encode with prepend/append/num_threads, decode,
get_vocab_size, encode_special, get_special_tokens) plus identity(): a short stable hash of the split
pattern, the merges and the special tokens, which resume fingerprints record, and encode_arrays(): the
ids of each text as a numpy array straight from tiktoken's buffer, without building Python lists (about a
quarter of encode's CPU time goes to those lists; the loader uses encode_arrays when a tokenizer has it).
"""
import hashlib
import logging
import os
import pickle
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .errors import ConfigError

logger = logging.getLogger(__name__)

_NO_SPECIALS = frozenset()

# GPT-4 style pre-tokenizer split (contractions, letter runs, numbers in groups of at most two digits as
# nanochat does for small vocabs, punctuation runs, newlines, whitespace).
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)"""
    r"""|[^\r\n\p{L}\p{N}]?+\p{L}+"""
    r"""|\p{N}{1,2}"""
    r"""| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]"""
    r"""|\s+(?!\S)"""
    r"""|\s+"""
)

# nanochat's special tokens; <|bos|> delimits documents and starts every packed row.
SPECIAL_TOKENS = [
    "<|bos|>",
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",
    "<|output_start|>", "<|output_end|>",
]
BOS = "<|bos|>"
TOKENIZER_FILE = "tokenizer.pkl"


class Tokenizer:
    """A tiktoken Encoding with nanochat's tokenizer interface."""

    def __init__(self, enc, bos_token=BOS):
        self.enc = enc
        self.bos_token = bos_token
        self._bos_id = self.encode_special(bos_token)
        self._identity = None
        self._pool = None           # persistent encode threads (tiktoken's batch call makes a pool per call)
        self._pool_lock = threading.Lock()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_pool"] = None
        del state["_pool_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._pool_lock = threading.Lock()

    @classmethod
    def from_ranks(cls, pattern, mergeable_ranks, special_tokens=None, name="shardstream"):
        """Build from a split pattern and {token_bytes: rank}; specials get ids after the merges."""
        import tiktoken
        specials = special_tokens if special_tokens is not None else SPECIAL_TOKENS
        if isinstance(specials, dict):
            special_ids = dict(specials)
        else:
            offset = len(mergeable_ranks)
            special_ids = {s: offset + i for i, s in enumerate(specials)}
        if BOS not in special_ids:
            raise ConfigError(f"special tokens must include {BOS!r} (documents are delimited by it)")
        enc = tiktoken.Encoding(name=name, pat_str=pattern,
                                mergeable_ranks={bytes(k): int(v) for k, v in mergeable_ranks.items()},
                                special_tokens=special_ids)
        return cls(enc)

    # -- nanochat's interface -------------------------------------------------------------------------
    def get_bos_token_id(self):
        return self._bos_id

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_special_tokens(self):
        return set(self.enc.special_tokens_set)

    def encode_special(self, text):
        try:
            return self.enc.encode_single_token(text)
        except KeyError:
            raise ConfigError(f"{text!r} is not a special token of this tokenizer "
                              f"(have: {sorted(self.enc.special_tokens_set)})") from None

    def _special_id(self, tok):
        return tok if isinstance(tok, int) else self.encode_special(tok)

    def encode(self, text, prepend=None, append=None, num_threads=8):
        """str -> list of ids; list of str -> list of lists (encoded in parallel with num_threads).

        prepend/append: a token id or a special token's text, added to each sequence.
        """
        pre = None if prepend is None else self._special_id(prepend)
        post = None if append is None else self._special_id(append)
        if isinstance(text, str):
            ids = self.enc.encode_ordinary(text)
            if pre is not None:
                ids.insert(0, pre)
            if post is not None:
                ids.append(post)
            return ids
        if isinstance(text, (list, tuple)):
            rows = self._encode_batch(list(text), num_threads)
            if pre is not None:
                for row in rows:
                    row.insert(0, pre)
            if post is not None:
                for row in rows:
                    row.append(post)
            return rows
        raise ConfigError(f"encode takes a str or a list of str, got {type(text).__name__}")

    __call__ = encode

    def encode_arrays(self, texts, num_threads=8):
        """list of str -> list of read-only numpy uint32 arrays: the ids encode(texts) gives, no specials
        added, encoded in parallel with num_threads without creating a Python int per token."""
        if not isinstance(texts, (list, tuple)):
            raise ConfigError(f"encode_arrays takes a list of str, got {type(texts).__name__}")
        return self._encode_batch(list(texts), num_threads, self._encode_array)

    def _encode_array(self, text):
        # with no special tokens allowed, tiktoken's core encodes special-token text as ordinary text,
        # exactly as encode_ordinary does; a string it cannot take (lone surrogates) goes the list way,
        # where tiktoken repairs it
        try:
            buf = self.enc._core_bpe.encode_to_tiktoken_buffer(text, _NO_SPECIALS)
        except UnicodeEncodeError:
            return np.array(self.enc.encode_ordinary(text), dtype=np.uint32)
        return np.frombuffer(buf, dtype=np.uint32)

    def _encode_batch(self, texts, num_threads, encode=None):
        """encode (default encode_ordinary) over texts on num_threads threads of a pool kept between calls;
        the texts are cut into 2 * num_threads contiguous pieces of about equal characters (same tokens as
        one by one)."""
        encode = encode or self.enc.encode_ordinary
        if num_threads <= 1 or len(texts) <= 1:
            return [encode(t) for t in texts]
        with self._pool_lock:
            if self._pool is None or self._pool._max_workers < num_threads:
                if self._pool is not None:
                    self._pool.shutdown(wait=False)
                self._pool = ThreadPoolExecutor(num_threads, thread_name_prefix="shardstream-encode")
            pool = self._pool
        pieces = min(len(texts), 2 * num_threads)
        total = sum(map(len, texts))
        cuts, acc, k = [0], 0, 1
        for i, t in enumerate(texts):
            acc += len(t)
            if acc * pieces >= k * total and len(cuts) < pieces:
                cuts.append(i + 1)
                k += 1
        if cuts[-1] != len(texts):
            cuts.append(len(texts))
        futures = [pool.submit(lambda a, b: [encode(t) for t in texts[a:b]], a, b)
                   for a, b in zip(cuts, cuts[1:]) if b > a]
        return [row for f in futures for row in f.result()]

    def decode(self, ids):
        return self.enc.decode(list(ids))

    def id_to_token(self, token_id):
        return self.enc.decode([token_id])

    def identity(self):
        """A short stable hash of pattern + merges + special tokens (recorded in resume fingerprints)."""
        if self._identity is None:
            h = hashlib.sha256()
            h.update(self.enc._pat_str.encode())
            h.update(b"\0")
            for tok, rank in sorted(self.enc._mergeable_ranks.items(), key=lambda kv: kv[1]):
                h.update(rank.to_bytes(4, "little"))
                h.update(len(tok).to_bytes(2, "little"))
                h.update(tok)
            for s, i in sorted(self.enc._special_tokens.items()):
                h.update(f"\0{s}={i}".encode())
            self._identity = "bpe-" + h.hexdigest()[:16]
        return self._identity

    # -- persistence ----------------------------------------------------------------------------------
    def save(self, directory):
        """Write <directory>/tokenizer.pkl atomically (plain data: pattern, ranks, specials)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        data = {"format": "shardstream-bpe/1", "pattern": self.enc._pat_str,
                "mergeable_ranks": dict(self.enc._mergeable_ranks),
                "special_tokens": dict(self.enc._special_tokens)}
        path = directory / TOKENIZER_FILE
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=TOKENIZER_FILE + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                pickle.dump(data, f, protocol=pickle.HIGHEST_PROTOCOL)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        logger.info("saved tokenizer %s (vocab %d) to %s", self.identity(), self.get_vocab_size(), path)
        return path

    @classmethod
    def load(cls, directory):
        """Load what save() wrote; a nanochat tokenizer.pkl (a pickled tiktoken Encoding) works too."""
        path = Path(directory)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise ConfigError(f"no tokenizer at {path}: train one with train_tokenizer_from_shards(...) "
                              f"and save it there")
        with open(path, "rb") as f:
            obj = pickle.load(f)
        if isinstance(obj, dict) and obj.get("format") == "shardstream-bpe/1":
            return cls.from_ranks(obj["pattern"], obj["mergeable_ranks"], obj["special_tokens"])
        import tiktoken
        if isinstance(obj, tiktoken.Encoding):
            return cls(obj)
        raise ConfigError(f"{path} is not a tokenizer file this version understands")


def train_tokenizer(texts, vocab_size, pattern=SPLIT_PATTERN, special_tokens=None):
    """Train a BPE with rustbpe on an iterable of strings. vocab_size counts the special tokens too.

    Too little text can give fewer merges than asked for: the tokenizer comes out smaller, with a warning."""
    import rustbpe
    specials = list(special_tokens if special_tokens is not None else SPECIAL_TOKENS)
    n_merges_vocab = vocab_size - len(specials)
    if n_merges_vocab < 256:
        raise ConfigError(f"vocab_size {vocab_size} is too small: it must be at least "
                          f"{256 + len(specials)} (256 bytes + {len(specials)} special tokens)")
    chars = [0]

    def counted():
        for text in texts:
            chars[0] += len(text)
            yield text

    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(counted(), n_merges_vocab, pattern=pattern)
    ranks = {bytes(k): v for k, v in tok.get_mergeable_ranks()}
    if len(ranks) < n_merges_vocab:
        # rustbpe stops early when the text runs out of pairs; the model then gets the smaller vocab: say so
        logger.warning("tokenizer: vocab size %d asked for (%s merges), but only %s merges were learned, so the "
                       "vocab is %s: the training text (%s characters) has too few distinct pairs to learn more "
                       "merges. Train on more text, or ask for a vocab size of at most %s (what this text gives).",
                       vocab_size, f"{n_merges_vocab - 256:,}", f"{len(ranks) - 256:,}",
                       f"{len(ranks) + len(specials):,}", f"{chars[0]:,}", f"{len(ranks) + len(specials):,}")
    return Tokenizer.from_ranks(tok.get_pattern(), ranks, specials)


def iter_shard_texts(paths, max_chars=None, doc_cap=10_000):
    """Documents' `text` from parquet shards, each cropped to doc_cap chars, up to max_chars in total."""
    import pyarrow.parquet as pq
    total = 0
    for path in paths:
        pf = pq.ParquetFile(path)
        if "text" not in pf.schema_arrow.names:
            raise ConfigError(f"{path} has no 'text' column (columns: {pf.schema_arrow.names})")
        for rg in range(pf.num_row_groups):
            for text in pf.read_row_group(rg, columns=["text"]).column("text").to_pylist():
                text = text[:doc_cap]
                yield text
                total += len(text)
                if max_chars is not None and total >= max_chars:
                    return


def train_tokenizer_from_shards(paths, vocab_size=1024, max_chars=10_000_000, doc_cap=10_000):
    """Train on the `text` column of parquet shards (at most max_chars characters)."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise ConfigError("train_tokenizer_from_shards needs at least one parquet shard")
    tok = train_tokenizer(iter_shard_texts(paths, max_chars, doc_cap), vocab_size)
    logger.info("trained tokenizer %s: vocab %d from %d shard(s)", tok.identity(), tok.get_vocab_size(),
                len(paths))
    return tok
