"""The loader's two tokenize paths (numpy ids from encode_arrays, nanochat-style lists) give the same
rows and resume exactly; encode_arrays equals encode; val-split shard reads stay out of INFO logs."""
import json
import logging

import numpy as np
import pytest

from shardstream.loader import tokenizing_distributed_data_loader_with_state_bos_bestfit as loader_fn
from shardstream.tokenizer import train_tokenizer

from test_loader import KW, _write_shards, reference_docs, reference_rows, take, train_paths


class ListOnlyTokenizer:
    """nanochat's tokenizer interface only: encode returns lists (no encode_arrays)."""

    def __init__(self, tok):
        self.tok = tok

    def get_bos_token_id(self):
        return self.tok.get_bos_token_id()

    def identity(self):
        return self.tok.identity()

    def encode(self, texts, prepend=None, append=None, num_threads=8):
        return self.tok.encode(texts, prepend=prepend, append=append, num_threads=num_threads)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return _write_shards(tmp_path_factory.mktemp("shards"), seed=3)


@pytest.fixture(scope="module")
def tok(data_dir):
    from shardstream.tokenizer import train_tokenizer_from_shards
    return train_tokenizer_from_shards([data_dir / "shard_00000.parquet"], vocab_size=512)


def test_list_and_array_paths_equal_the_reference(tok, data_dir):
    assert hasattr(tok, "encode_arrays") and not hasattr(ListOnlyTokenizer(tok), "encode_arrays")
    n = 50
    ref = reference_rows(tok, reference_docs(train_paths(data_dir), 0, 1, 10), 4, 64, 40, n)
    arrays = take(loader_fn(tok, split="train", data_dir=data_dir, **KW), n)
    lists = take(loader_fn(ListOnlyTokenizer(tok), split="train", data_dir=data_dir, **KW), n)
    assert arrays == lists          # same batches and same states (the tokenizer identity is the same)
    gen = loader_fn(ListOnlyTokenizer(tok), split="train", data_dir=data_dir, **KW)
    for k in range(n):
        x, y, _ = next(gen)
        assert np.array_equal(x.numpy(), ref[k][:, :-1]) and np.array_equal(y.numpy(), ref[k][:, 1:])
    gen.close()


def test_list_path_resumes_exactly(tok, data_dir):
    lt = ListOnlyTokenizer(tok)
    run = take(loader_fn(lt, split="train", data_dir=data_dir, **KW), 90)
    for k in (0, 21, 40):
        gen = loader_fn(lt, split="train", data_dir=data_dir, resume_state_dict=json.loads(run[k][1]), **KW)
        assert take(gen, 50) == run[k:k + 50]


def test_encode_arrays_equals_encode():
    texts = ["plain words here", "", "special text <|bos|> and <|user_start|> stays ordinary",
             "lone surrogate \ud800 repaired", "café naïve 日本語 🙂", "x" * 3000] * 5
    tok = train_tokenizer([t for t in texts if "\ud800" not in t] * 4, vocab_size=300)
    for threads in (1, 3):
        arrays = tok.encode_arrays(texts, num_threads=threads)
        assert all(a.dtype == np.uint32 for a in arrays)
        assert [a.tolist() for a in arrays] == tok.encode(texts, num_threads=threads)
    assert tok.encode_arrays([]) == []
    with pytest.raises(Exception, match="list of str"):
        tok.encode_arrays("a str")


def test_val_reads_log_at_debug_train_at_info(tok, data_dir, caplog):
    with caplog.at_level(logging.DEBUG, logger="shardstream.loader"):
        gen = loader_fn(tok, split="val", data_dir=data_dir, **KW)
        for _ in range(20):
            _, _, state = next(gen)         # the val shard wraps several times
        gen.close()
        assert state["epoch"] > 2
        val = [r for r in caplog.records if r.getMessage() == "Reading shard_00004.parquet"]
        assert len(val) >= 2 and all(r.levelno == logging.DEBUG for r in val)
        caplog.clear()
        gen = loader_fn(tok, split="train", data_dir=data_dir, **KW)
        next(gen)
        gen.close()
        train = [r for r in caplog.records if r.getMessage().startswith("Reading shard_")]
        assert train and train[0].levelno == logging.INFO
