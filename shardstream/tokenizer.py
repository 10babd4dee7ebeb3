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

Only tiktoken's public API is used: the Encoding constructor's arguments (pattern, merges, specials) are
kept beside the Encoding (identity and save read them, not the Encoding's private fields), and a pickled
Encoding (nanochat's tokenizer.pkl) is read back as those arguments, which is its pickle state.
tests/test_library_contracts.py pins what is assumed of tiktoken.
"""
import codecs
import copyreg
import hashlib
import io
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


# tiktoken.Encoding's constructor arguments: what a Tokenizer keeps, saves and hashes
ENCODING_ARGS = ("name", "pat_str", "mergeable_ranks", "special_tokens")


class Tokenizer:
    """A tiktoken Encoding with nanochat's tokenizer interface.

    parts: the arguments enc was built with (ENCODING_ARGS); read from enc's pickle state when not given."""

    def __init__(self, enc, bos_token=BOS, parts=None):
        self.enc = enc
        self._parts = dict(parts) if parts is not None else encoding_parts(enc)
        self.bos_token = bos_token
        self._bos_id = self.encode_special(bos_token)
        self._identity = None
        self._reset()

    def _reset(self):
        self._pool = None           # persistent encode threads (tiktoken's batch call makes a pool per call)
        self._pool_size = 0
        self._pool_lock = threading.Lock()
        self._to_array = None       # encode_arrays' per-text encoder, chosen on first use

    def __getstate__(self):
        # pickle the constructor's arguments, not the Encoding: rebuilt through the public constructor
        return {k: v for k, v in self.__dict__.items()
                if k not in ("enc", "_pool", "_pool_size", "_pool_lock", "_to_array")}

    def __setstate__(self, state):
        state = dict(state)
        enc = state.pop("enc", None)        # a Tokenizer pickled before parts were kept carries its Encoding
        if "_parts" not in state:
            state["_parts"] = encoding_parts(enc)
        self.__dict__.update(state)
        self.enc = enc if enc is not None else _build_encoding(self._parts)
        self._reset()

    @classmethod
    def from_ranks(cls, pattern, mergeable_ranks, special_tokens=None, name="shardstream"):
        """Build from a split pattern and {token_bytes: rank}; specials get ids after the merges."""
        specials = special_tokens if special_tokens is not None else SPECIAL_TOKENS
        if isinstance(specials, dict):
            special_ids = dict(specials)
        else:
            offset = len(mergeable_ranks)
            special_ids = {s: offset + i for i, s in enumerate(specials)}
        if BOS not in special_ids:
            raise ConfigError(f"special tokens must include {BOS!r} (documents are delimited by it)")
        parts = {"name": name, "pat_str": pattern,
                 "mergeable_ranks": {bytes(k): int(v) for k, v in mergeable_ranks.items()},
                 "special_tokens": special_ids}
        return cls(_build_encoding(parts), parts=parts)

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
        """list of str -> list of numpy uint32 arrays (read-only: most are views of tiktoken's buffer): the ids
        encode(texts) gives, no specials added, encoded in parallel with num_threads without creating a
        Python int per token."""
        if not isinstance(texts, (list, tuple)):
            raise ConfigError(f"encode_arrays takes a list of str, got {type(texts).__name__}")
        if self._to_array is None:
            self._to_array, numpy_path = array_encoder(self.enc)
            if not numpy_path:
                logger.warning("tiktoken %s has no encode_to_numpy that gives encode_ordinary's ids (it needs "
                               "tiktoken >= 0.11): encode_arrays copies lists instead, about 10%% slower",
                               _tiktoken_version())
        return self._encode_batch(list(texts), num_threads, self._to_array)

    def _encode_batch(self, texts, num_threads, encode=None):
        """encode (default encode_ordinary) over texts on num_threads threads of a pool kept between calls;
        the texts are cut into 2 * num_threads contiguous pieces of about equal characters (same tokens as
        one by one)."""
        encode = encode or self.enc.encode_ordinary
        if num_threads <= 1 or len(texts) <= 1:
            return [encode(t) for t in texts]
        with self._pool_lock:
            if self._pool is None or self._pool_size < num_threads:
                if self._pool is not None:
                    self._pool.shutdown(wait=False)
                self._pool = ThreadPoolExecutor(num_threads, thread_name_prefix="shardstream-encode")
                self._pool_size = num_threads
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
            # the same bytes as ever (old resume states record this hash): keep the order and encodings
            parts = self._parts
            h = hashlib.sha256()
            h.update(parts["pat_str"].encode())
            h.update(b"\0")
            for tok, rank in sorted(parts["mergeable_ranks"].items(), key=lambda kv: kv[1]):
                h.update(rank.to_bytes(4, "little"))
                h.update(len(tok).to_bytes(2, "little"))
                h.update(tok)
            for s, i in sorted(parts["special_tokens"].items()):
                h.update(f"\0{s}={i}".encode())
            self._identity = "bpe-" + h.hexdigest()[:16]
        return self._identity

    # -- persistence ----------------------------------------------------------------------------------
    def save(self, directory):
        """Write <directory>/tokenizer.pkl atomically (plain data: pattern, ranks, specials)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        data = {"format": "shardstream-bpe/1", "pattern": self._parts["pat_str"],
                "mergeable_ranks": dict(self._parts["mergeable_ranks"]),
                "special_tokens": dict(self._parts["special_tokens"])}
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
            try:
                obj = _Unpickler(f).load()
            except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
                raise ConfigError(f"{path} is not a tokenizer file this version understands ({e})") from None
        if isinstance(obj, dict) and obj.get("format") == "shardstream-bpe/1":
            return cls.from_ranks(obj["pattern"], obj["mergeable_ranks"], obj["special_tokens"])
        if isinstance(obj, _EncodingState):
            parts = _state_parts(obj, path)
            return cls(_build_encoding(parts), parts=parts)
        raise ConfigError(f"{path} is not a tokenizer file this version understands")


def array_encoder(enc):
    """(text -> numpy uint32 ids equal to enc.encode_ordinary(text), True when it is tiktoken's numpy path).

    tiktoken's public encode_to_numpy(text, disallowed_special=()) skips the Python list; the ids' list
    copied into an array is the fallback where that gives other ids (tiktoken 0.9 and 0.10 encode
    special-token text there as the special token) or is missing (before 0.9). A probe text holding every
    special token decides, once per Encoding."""
    ordinary = enc.encode_ordinary

    def via_list(text):
        return np.array(ordinary(text), dtype=np.uint32)

    to_numpy = getattr(enc, "encode_to_numpy", None)
    probe = "a " + " ".join(sorted(enc.special_tokens_set)) + " b"
    try:
        same = to_numpy is not None and to_numpy(probe, disallowed_special=()).tolist() == ordinary(probe)
    except Exception:       # noqa: BLE001 - any failure of the probe means: do not use it
        same = False
    if not same:
        return via_list, False

    def via_numpy(text):
        # a string tiktoken's core cannot take (lone surrogates) goes the list way, where tiktoken repairs it
        try:
            return to_numpy(text, disallowed_special=())
        except UnicodeEncodeError:
            return via_list(text)

    return via_numpy, True


def _tiktoken_version():
    import tiktoken
    return getattr(tiktoken, "__version__", "?")


def _build_encoding(parts):
    import tiktoken
    return tiktoken.Encoding(**{k: parts[k] for k in ENCODING_ARGS})


class _EncodingState:
    """Stands in for tiktoken.Encoding while unpickling: keeps the state pickle hands it, which tiktoken
    makes the Encoding constructor's keyword arguments (its __setstate__ is __init__(**state))."""

    def __setstate__(self, state):
        self.state = state


class _Unpickler(pickle.Unpickler):
    """Reads tokenizer.pkl: plain data, or a pickled tiktoken Encoding read as its state; any other class
    is refused (a tokenizer file runs no code)."""

    # what pickle itself writes for an object (protocols 0 and 1) and for bytes (protocols 0 to 2), in its
    # Python 2 spelling too (protocols 0 to 2 write that)
    ALLOWED = {("copyreg", "_reconstructor"): copyreg._reconstructor, ("copy_reg", "_reconstructor"):
               copyreg._reconstructor, ("builtins", "object"): object, ("__builtin__", "object"): object,
               ("_codecs", "encode"): codecs.encode}

    def find_class(self, module, name):
        if name == "Encoding" and module.split(".")[0] == "tiktoken":
            return _EncodingState
        if (module, name) in self.ALLOWED:
            return self.ALLOWED[module, name]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _state_parts(obj, where):
    state = getattr(obj, "state", None)
    if isinstance(state, str):
        raise ConfigError(f"{where} is tiktoken's registered encoding {state!r}, pickled by name only: a "
                          f"Tokenizer needs an Encoding built from its own arguments (train one with "
                          f"train_tokenizer_from_shards(...))")
    if not isinstance(state, dict) or not set(ENCODING_ARGS) <= set(state):
        # tiktoken changed how an Encoding pickles: tests/test_library_contracts.py says so first
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ConfigError(f"{where}: a pickled tiktoken Encoding whose state is not its constructor's "
                          f"arguments {ENCODING_ARGS} (got {got})")
    return {k: state[k] for k in ENCODING_ARGS}


def encoding_parts(enc):
    """The constructor arguments (ENCODING_ARGS) of a tiktoken Encoding, read from its pickle state
    (tiktoken has no public getter for the pattern)."""
    return _state_parts(_Unpickler(io.BytesIO(pickle.dumps(enc))).load(), f"tiktoken Encoding {enc.name!r}")


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
