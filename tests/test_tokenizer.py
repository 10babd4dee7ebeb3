"""The tokenizer: trains offline with rustbpe, encodes with tiktoken, round-trips, is deterministic."""
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shardstream.errors import ConfigError
from shardstream.tokenizer import (BOS, SPECIAL_TOKENS, TOKENIZER_FILE, Tokenizer, iter_shard_texts,
                                   train_tokenizer, train_tokenizer_from_shards)

TEXTS = [
    "The old man walked slowly to the harbor, where the boats waited in the morning light.",
    "In 1987 she wrote 42 letters; only 3 arrived.\n\nThe rest were lost.",
    "Don't you think it's strange? We'll see what they've done.",
    "   leading spaces, tabs\tand trailing spaces   ",
    "Unicode: café, naïve, Straße, 日本語, emoji 🙂🚀.",
] * 40


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, vocab_size=400)


def test_round_trip_and_bos(tok):
    bos = tok.get_bos_token_id()
    assert bos == tok.encode_special(BOS)
    assert tok.get_vocab_size() <= 400
    assert bos < tok.get_vocab_size()
    for text in set(TEXTS) | {"", "x", "new words never seen: zyzzyva quokka"}:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert bos not in ids
    # list in -> list of lists, prepend/append by id or by name
    rows = tok.encode(TEXTS[:3], prepend=bos, append="<|assistant_end|>", num_threads=2)
    assert len(rows) == 3
    for text, row in zip(TEXTS[:3], rows):
        assert row[0] == bos and row[-1] == tok.encode_special("<|assistant_end|>")
        assert row[1:-1] == tok.encode(text)
    # merges learned: common text is shorter in tokens than in bytes
    assert len(tok.encode(TEXTS[0])) < len(TEXTS[0].encode()) / 2
    assert tok.get_special_tokens() == set(SPECIAL_TOKENS)


def test_threads_do_not_change_tokens(tok):
    texts = [t * (i % 7 + 1) for i, t in enumerate(TEXTS)]
    one_by_one = [tok.encode(t) for t in texts]
    for threads in (1, 2, 3, 8):
        assert tok.encode(texts, num_threads=threads) == one_by_one
    assert tok.encode([], num_threads=4) == []
    clone = pickle.loads(pickle.dumps(tok))         # the thread pool is not pickled; a new one starts
    assert clone.encode(texts, num_threads=2) == one_by_one


def test_encode_arrays_give_encodes_ids(tok):
    # the loader's numpy path must give the list path's ids exactly (exact resume depends on it)
    texts = [t * (i % 7 + 1) for i, t in enumerate(TEXTS)] + \
        ["", "<|bos|> is text here", "a<|user_start|>b", "lone \ud800 surrogate", "日本語 🙂"]
    want = tok.encode(texts, num_threads=1)
    for threads in (1, 2, 3, 8):
        arrays = tok.encode_arrays(texts, num_threads=threads)
        assert all(a.dtype == np.uint32 for a in arrays)
        assert [a.tolist() for a in arrays] == want
    clone = pickle.loads(pickle.dumps(tok))
    assert [a.tolist() for a in clone.encode_arrays(texts, num_threads=2)] == want
    assert clone.identity() == tok.identity() and clone.get_special_tokens() == tok.get_special_tokens()
    with pytest.raises(ConfigError, match="list of str"):
        tok.encode_arrays("one text")


def test_a_tokenizer_pickled_with_its_encoding_still_loads(tok):
    # Tokenizers pickled before they kept the Encoding's arguments carry the Encoding itself
    old = Tokenizer.__new__(Tokenizer)
    old.__setstate__({"enc": tok.enc, "bos_token": BOS, "_bos_id": tok.get_bos_token_id(), "_identity": None,
                      "_pool": None})
    assert old.identity() == tok.identity()
    assert [a.tolist() for a in old.encode_arrays(TEXTS[:5], num_threads=2)] == tok.encode(TEXTS[:5])


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (self.marker.touch, ())


def test_a_tokenizer_file_runs_no_code(tmp_path):
    marker = tmp_path / "ran"
    with open(tmp_path / TOKENIZER_FILE, "wb") as f:
        pickle.dump({"format": "shardstream-bpe/1", "pattern": _RunsCode(marker)}, f)
    with pytest.raises(ConfigError, match="not a tokenizer file"):
        Tokenizer.load(tmp_path)
    assert not marker.exists()
    (tmp_path / TOKENIZER_FILE).write_bytes(pickle.dumps(["not", "a", "tokenizer"]))
    with pytest.raises(ConfigError, match="not a tokenizer file"):
        Tokenizer.load(tmp_path)


def test_training_is_deterministic(tok):
    again = train_tokenizer(TEXTS, vocab_size=400)
    assert again.identity() == tok.identity()
    assert again.encode(TEXTS[:5]) == tok.encode(TEXTS[:5])
    other = train_tokenizer(TEXTS, vocab_size=350)
    assert other.identity() != tok.identity()


def test_save_load_atomic(tok, tmp_path):
    path = tok.save(tmp_path / "tok")
    assert path.name == TOKENIZER_FILE
    assert [p.name for p in (tmp_path / "tok").iterdir()] == [TOKENIZER_FILE]   # no temp file left
    loaded = Tokenizer.load(tmp_path / "tok")
    assert loaded.identity() == tok.identity()
    assert loaded.encode(TEXTS[:5], prepend=loaded.get_bos_token_id()) == \
        tok.encode(TEXTS[:5], prepend=tok.get_bos_token_id())
    # a nanochat-style tokenizer.pkl (a pickled tiktoken Encoding) loads too
    with open(tmp_path / TOKENIZER_FILE, "wb") as f:
        pickle.dump(tok.enc, f)
    assert Tokenizer.load(tmp_path).encode(TEXTS[1]) == tok.encode(TEXTS[1])


def test_train_from_shards(tmp_path):
    path = tmp_path / "shard_00000.parquet"
    pq.write_table(pa.table({"text": TEXTS}), path, row_group_size=64)
    t = train_tokenizer_from_shards([path], vocab_size=380, max_chars=5_000)
    assert t.decode(t.encode(TEXTS[4])) == TEXTS[4]
    texts = list(iter_shard_texts([path], max_chars=3_000, doc_cap=20))
    assert all(len(x) <= 20 for x in texts) and 3_000 <= sum(map(len, texts)) < 3_020 and len(texts) < len(TEXTS)
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(ConfigError, match="no 'text' column"):
        train_tokenizer_from_shards([tmp_path / "bad.parquet"])


def test_bad_inputs(tok, tmp_path):
    with pytest.raises(ConfigError, match="too small"):
        train_tokenizer(TEXTS, vocab_size=100)
    with pytest.raises(ConfigError, match="not a special token"):
        tok.encode("hi", prepend="<|nope|>")
    with pytest.raises(ConfigError, match="str or a list"):
        tok.encode(42)
    with pytest.raises(ConfigError, match="no tokenizer"):
        Tokenizer.load(tmp_path / "missing")


def test_warns_when_the_text_gives_fewer_merges_than_asked(caplog):
    # five distinct texts cannot fill a vocab of 4096: rustbpe stops early, and the user must hear of it
    with caplog.at_level("WARNING", logger="shardstream.tokenizer"):
        small = train_tokenizer(TEXTS, vocab_size=4096)
    got = small.get_vocab_size()
    assert got < 4096
    [rec] = [r for r in caplog.records if r.name == "shardstream.tokenizer" and r.levelname == "WARNING"]
    msg = rec.getMessage()
    assert "vocab size 4096 asked for (3,831 merges)" in msg
    assert f"only {got - 256 - len(SPECIAL_TOKENS):,} merges were learned, so the vocab is {got:,}" in msg
    assert f"({sum(map(len, TEXTS)):,} characters)" in msg
    assert "too few distinct pairs" in msg and "more text" in msg and f"at most {got:,}" in msg
    # asking for exactly what the text gives (or less) reaches the vocab: no warning
    caplog.clear()
    with caplog.at_level("WARNING", logger="shardstream.tokenizer"):
        exact = train_tokenizer(TEXTS, vocab_size=got)
        train_tokenizer(TEXTS, vocab_size=300)
    assert exact.get_vocab_size() == got
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
