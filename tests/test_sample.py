"""make_sample: nanochat's parquet layout, determinism, and text that reads like English."""
import re
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shardstream.errors import ConfigError
from shardstream.sample import cli, make_documents, make_sample, vocabulary

COMMON = set("""the a an and or but of in on at to from with by for this that it was is as there his her
    their our one no every each after before when while because although said""".split())


def read_texts(path):
    return pq.read_table(path).column("text").to_pylist()


def test_layout_is_nanochats(sample_dir):
    paths = sorted(sample_dir.glob("shard_*.parquet"))
    assert [p.name for p in paths] == [f"shard_{i:05d}.parquet" for i in range(6)]
    for path in paths:
        pf = pq.ParquetFile(path)
        assert pf.schema_arrow == pa.schema([("text", pa.string())])
        md = pf.metadata
        assert md.num_rows % 1024 == 0 and md.num_rows > 0
        assert md.num_row_groups == md.num_rows // 1024
        for g in range(md.num_row_groups):
            rg = md.row_group(g)
            assert rg.num_rows == 1024
            col = rg.column(0)
            assert col.compression == "ZSTD"
            assert not col.has_dictionary_page
            assert "PLAIN_DICTIONARY" not in col.encodings and "RLE_DICTIONARY" not in col.encodings
            assert not col.is_stats_set
    assert not list(sample_dir.glob("*.tmp")), "temporary files left behind"


def test_deterministic_for_a_seed_and_different_across_seeds(tmp_path):
    a = make_sample(tmp_path / "a", 2, 200_000, seed=7)
    b = make_sample(tmp_path / "b", 2, 200_000, seed=7)
    c = make_sample(tmp_path / "c", 2, 200_000, seed=8)
    assert [read_texts(p) for p in a] == [read_texts(p) for p in b]
    assert a[0].read_bytes() == b[0].read_bytes()
    assert read_texts(a[0]) != read_texts(c[0])
    assert read_texts(a[0]) != read_texts(a[1]), "shards of one sample must differ"


def test_chars_per_shard_roughly_met(tmp_path):
    for chars in (300_000, 3_000_000):
        (path,) = make_sample(tmp_path / str(chars), 1, chars, seed=1)
        docs = read_texts(path)
        assert len(docs) == 1024
        total = sum(map(len, docs))
        assert 0.9 * chars <= total <= 1.1 * chars, (chars, total)


def test_row_groups_chosen_from_size_or_given(tmp_path):
    (auto,) = make_sample(tmp_path / "auto", 1, 9_000_000, seed=0)        # ~2 row groups of ~4k-char docs
    assert pq.ParquetFile(auto).metadata.num_row_groups == 2
    (given,) = make_sample(tmp_path / "given", 1, 500_000, seed=0, row_groups=3)
    assert pq.ParquetFile(given).metadata.num_rows == 3 * 1024


def test_text_looks_like_english(sample_dir):
    docs = read_texts(sample_dir / "shard_00000.parquet")
    assert len(set(docs)) == len(docs), "documents repeat"
    words = re.findall(r"[A-Za-z0-9']+", " ".join(docs[:300]))
    assert len(words) > 10_000
    lower = [w.lower() for w in words]
    counts = Counter(lower)
    assert counts.most_common(1)[0][0] == "the"
    assert sum(w.isalpha() for w in words) / len(words) > 0.97
    assert sum(w in COMMON for w in lower) / len(lower) > 0.25       # function words, as in English
    assert len(counts) > 300                                          # a real vocabulary, not a few tokens
    vocab = vocabulary()
    assert all(w in vocab or w.isdigit() for w in lower)
    # sentences: start with a capital, end with . or ?, paragraphs separated by blank lines
    sentences = re.split(r"(?<=[.?])\s+", docs[0])
    assert all(s[0].isupper() and s[-1] in ".?" for s in sentences)
    assert any("\n\n" in d for d in docs)


def test_document_lengths_vary_with_median_of_a_few_thousand_chars():
    docs = make_documents(1024, 1024 * 4100, seed=3)
    lengths = np.array([len(d) for d in docs])
    assert 2000 <= np.median(lengths) <= 4000
    assert lengths.std() / lengths.mean() > 0.5                      # lognormal-ish spread
    assert lengths.max() > 3 * np.median(lengths)


def test_tiny_shards_still_have_a_sentence_per_doc():
    docs = make_documents(1024, 10_000, seed=0)                       # ~10 chars per doc asked
    assert len(docs) == 1024 and all(len(d) > 10 and d[-1] in ".?" for d in docs)


@pytest.mark.parametrize("kwargs", [dict(shards=0, chars_per_shard=1000), dict(shards=1, chars_per_shard=0),
                                    dict(shards=1, chars_per_shard=1000, row_groups=0)])
def test_bad_arguments_are_clear_errors(tmp_path, kwargs):
    with pytest.raises(ConfigError, match="must be"):
        make_sample(tmp_path, **kwargs)


def test_cli_writes_and_reports(tmp_path, capsys):
    assert cli([str(tmp_path / "s"), "--shards", "2", "--chars-per-shard", "100000", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "shard_00001.parquet" in out and "wrote 2 shards" in out and "MB in all" in out
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["shard_00000.parquet", "shard_00001.parquet"]


def test_the_fineweb_layout(tmp_path, capsys):
    from shardstream.sample import FINEWEB_FILES, make_fineweb_sample
    paths = make_fineweb_sample(tmp_path / "fw", chars_per_file=30_000, seed=1)
    assert [str(p.relative_to(tmp_path / "fw")) for p in paths] == sorted(FINEWEB_FILES)
    assert {"data/CC-MAIN-2024-10/000_00001.parquet", "sample/10BT/000_00003.parquet"} <= set(FINEWEB_FILES)
    assert (tmp_path / "fw" / "README.md").read_text().startswith("---")
    texts = set()
    for p in paths:
        t = pq.read_table(p)
        assert t.schema.names == ["text", "id", "url", "dump"]
        assert all(t.schema.field(n).type == pa.string() for n in t.schema.names)
        assert 20_000 < sum(map(len, t.column("text").to_pylist())) < 40_000
        rel = str(p.relative_to(tmp_path / "fw"))
        if rel.startswith("data/"):
            assert set(t.column("dump").to_pylist()) == {rel.split("/")[1]}
        texts.add(t.column("text")[0].as_py())
    assert len(texts) == len(paths)                                     # files differ
    again = make_fineweb_sample(tmp_path / "fw2", chars_per_file=30_000, seed=1)
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in paths]       # deterministic
    assert cli([str(tmp_path / "fw3"), "--layout", "fineweb"]) == 0
    assert (tmp_path / "fw3" / "sample/10BT/000_00000.parquet").stat().st_size < 1_000_000   # small by default
    assert "wrote 7" in capsys.readouterr().out
    assert cli([str(tmp_path / "fw4"), "--layout", "fineweb", "--checksums"]) == 2
