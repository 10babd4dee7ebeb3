"""Decompression bombs: verify.py's row-group caps (footer) and the loader's checks before and while reading.

A "bomb" here is a real parquet written by pyarrow: 4 MiB of one repeated character, which zstd packs into a
few KB. Caps of 1-2 MiB stand for the 512 MiB default, so the data stays small.
"""
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shardstream.errors import ConfigError, CorruptShardError
from shardstream.loader import READ_BATCH_ROWS, ShardPlan, _open_parquet, _read_texts, iter_doc_batches
from shardstream.settings import read
from shardstream.verify import (DEFAULT_MAX_ROW_GROUP_BYTES, DEFAULT_MAX_ROW_GROUP_ROWS, MAX_BYTES_ENV, MAX_ROWS_ENV,
                                RowGroupLimits, check_parquet, configure_row_group_limits, row_group_limits,
                                text_column_index)

MIB = 1 << 20
DOC = 64 * 1024                 # characters per bomb document
BOMB_DOCS = 64                  # 64 x 64 KiB = 4 MiB of "a"


@pytest.fixture(autouse=True)
def _default_caps():
    configure_row_group_limits()        # the process's caps are the defaults before and after each test
    yield
    configure_row_group_limits()


def write_bomb(path, docs=BOMB_DOCS, doc_chars=DOC, dictionary=False):
    """`docs` documents of doc_chars "a"s in one row group, zstd; plain encoding unless dictionary=True."""
    pq.write_table(pa.table({"text": ["a" * doc_chars] * docs}), path, row_group_size=docs, compression="zstd",
                   use_dictionary=dictionary, write_statistics=False)
    return path


def declared_text_bytes(path, rg_idx=0):
    meta = pq.ParquetFile(path).metadata
    return meta.row_group(rg_idx).column(text_column_index(meta)).total_uncompressed_size


@pytest.fixture
def bomb(tmp_path):
    p = write_bomb(tmp_path / "shard_00001.parquet")
    assert p.stat().st_size < 64 * 1024                   # a few KB on disk...
    assert declared_text_bytes(p) >= BOMB_DOCS * DOC      # ...declaring 4 MiB uncompressed
    return p


# --- the footer check (check_parquet, run on every downloaded shard) ---------------------------------

def test_check_parquet_rejects_a_bomb_over_the_cap_naming_row_group_size_and_cap(bomb):
    with pytest.raises(CorruptShardError) as e:
        check_parquet(bomb, max_row_group_bytes=MIB)
    msg = str(e.value)
    assert str(bomb) in msg and "row group 0" in msg
    assert f"{declared_text_bytes(bomb):,}" in msg and f"{MIB:,}" in msg
    assert f"raise {MAX_BYTES_ENV}" in msg


def test_the_cap_comes_from_the_process_caps_too(bomb):
    configure_row_group_limits(max_bytes=MIB)           # what an edge does with SHARDSTREAM_MAX_ROW_GROUP_BYTES
    with pytest.raises(CorruptShardError, match=r"row group 0 .* over the cap of 1,048,576 bytes"):
        check_parquet(bomb)
    assert check_parquet(bomb, max_row_group_bytes=8 * MIB) == (BOMB_DOCS, 1)     # the argument wins


def test_the_bomb_passes_the_default_cap(bomb):
    assert DEFAULT_MAX_ROW_GROUP_BYTES > 8 * MIB
    assert check_parquet(bomb) == (BOMB_DOCS, 1)


def test_rows_per_row_group_are_capped(bomb):
    with pytest.raises(CorruptShardError, match=rf"row group 0 declares {BOMB_DOCS} rows, over the cap of 10 rows"):
        check_parquet(bomb, max_row_group_rows=10)
    configure_row_group_limits(max_rows=10)
    with pytest.raises(CorruptShardError, match=f"raise {MAX_ROWS_ENV}"):
        check_parquet(bomb)
    assert check_parquet(bomb, max_row_group_rows=BOMB_DOCS) == (BOMB_DOCS, 1)


def test_every_row_group_is_checked(tmp_path):
    p = tmp_path / "two.parquet"
    pq.write_table(pa.table({"other": list(range(8)), "text": ["small"] * 4 + ["b" * (512 * 1024)] * 4}), p,
                   row_group_size=4, compression="zstd", use_dictionary=False)
    with pytest.raises(CorruptShardError, match="row group 1 declares") as e:
        check_parquet(p, max_row_group_bytes=MIB)
    assert "row group 0" not in str(e.value)
    assert check_parquet(p, max_row_group_bytes=4 * MIB) == (8, 2)


@pytest.mark.parametrize("bad", ["abc", "0", "-5", "1.5", "1e9", "512MB"])
def test_a_bad_cap_setting_is_a_config_error_naming_it(bad):
    for var in (MAX_BYTES_ENV, MAX_ROWS_ENV):
        with pytest.raises(ConfigError) as e:
            read(var, env={var: bad})
        assert var in str(e.value) and repr(bad) in str(e.value)
    with pytest.raises(ConfigError, match="max_row_group_bytes"):
        configure_row_group_limits(max_bytes=bad)
    assert row_group_limits() == RowGroupLimits()       # a refused setting leaves the caps as they were


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "x"])
def test_a_bad_cap_argument_is_a_config_error(sample_dir, bad):
    with pytest.raises(ConfigError, match="max_row_group_bytes"):
        check_parquet(sample_dir / "shard_00000.parquet", max_row_group_bytes=bad)
    with pytest.raises(ConfigError, match="max_row_group_rows"):
        check_parquet(sample_dir / "shard_00000.parquet", max_row_group_rows=bad)


def test_limits_resolve_argument_then_process_caps_then_default(monkeypatch):
    monkeypatch.setenv(MAX_BYTES_ENV, "2048")           # library code never reads the environment
    assert row_group_limits() == RowGroupLimits(DEFAULT_MAX_ROW_GROUP_BYTES, DEFAULT_MAX_ROW_GROUP_ROWS)
    assert read(MAX_BYTES_ENV, env={MAX_BYTES_ENV: " "}) is None                # empty: unset
    configure_row_group_limits(read(MAX_BYTES_ENV, env={MAX_BYTES_ENV: " 2048 "}), 7)
    got = row_group_limits()
    assert (got.max_bytes, got.max_rows) == (2048, 7)
    got = row_group_limits(max_bytes=4096, max_rows=9)
    assert (got.max_bytes, got.max_rows) == (4096, 9)
    configure_row_group_limits(None, None)
    assert row_group_limits() == RowGroupLimits()


def test_the_sample_shards_pass_the_default_caps(sample_dir):
    shards = sorted(sample_dir.glob("shard_*.parquet"))
    assert len(shards) >= 2
    for p in shards:
        rows, groups = check_parquet(p)
        assert rows > 0 and groups >= 1


# --- the loader (also reads local folders that were never verified) ----------------------------------

def test_read_texts_refuses_the_bomb_before_reading(bomb):
    pf = _open_parquet(bomb)
    assert _read_texts(pf, 0, bomb) == ["a" * DOC] * BOMB_DOCS          # the default cap lets it through
    configure_row_group_limits(max_bytes=MIB)
    with pytest.raises(CorruptShardError) as e:
        _read_texts(pf, 0, bomb)
    msg = str(e.value)
    assert str(bomb) in msg and "row group 0 declares" in msg and f"{MIB:,}" in msg and MAX_BYTES_ENV in msg


def test_read_texts_equals_pyarrow_on_the_sample_shards(sample_dir):
    for p in sorted(sample_dir.glob("shard_*.parquet"))[:2]:
        pf = _open_parquet(p)
        for rg in range(pf.num_row_groups):
            want = pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()
            assert len(want) > READ_BATCH_ROWS                  # read in several steps
            assert _read_texts(pf, rg, p) == want


def test_read_texts_stops_a_dictionary_bomb_while_decoding(tmp_path):
    # honest footer: one 16 KiB dictionary entry, 256 tiny indices -> declares a few KB, decodes to 4 MiB
    p = write_bomb(tmp_path / "dict.parquet", docs=256, doc_chars=16 * 1024, dictionary=True)
    assert declared_text_bytes(p) < 64 * 1024
    assert check_parquet(p, max_row_group_bytes=MIB) == (256, 1)       # the footer cannot tell
    configure_row_group_limits(max_bytes=MIB)
    with pytest.raises(CorruptShardError) as e:
        _read_texts(_open_parquet(p), 0, p)
    msg = str(e.value)
    assert "row group 0 decodes to more than 1,048,576 bytes" in msg and MAX_BYTES_ENV in msg
    so_far = int(msg.split("bytes of `text` (the cap per row group; ")[1].split(" read so far")[0].replace(",", ""))
    assert MIB < so_far <= MIB + READ_BATCH_ROWS * (16 * 1024 + 8)       # stopped one step past the cap


def _zigzag_varint(n):
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def test_read_texts_stops_a_footer_that_lies(bomb, tmp_path):
    """Rewrite the footer's declared uncompressed size (an i64 varint) to 1.1 MB: pyarrow still reads the
    full 4 MiB (it allocates by the page headers), so only the check while decoding can stop it."""
    liar = tmp_path / "liar.parquet"
    data = bytearray(bomb.read_bytes())
    footer_len = int.from_bytes(data[-8:-4], "little")
    start = len(data) - 8 - footer_len
    true, fake = _zigzag_varint(declared_text_bytes(bomb)), _zigzag_varint(1_100_000)
    assert len(true) == len(fake)
    footer = bytes(data[start:-8])
    assert footer.count(true) >= 1             # the column chunk's size (and the row group's total_byte_size)
    data[start:-8] = footer.replace(true, fake)
    liar.write_bytes(bytes(data))
    assert declared_text_bytes(liar) == 1_100_000
    assert pq.read_table(liar).column("text").to_pylist() == ["a" * DOC] * BOMB_DOCS     # pyarrow reads it all
    assert check_parquet(liar, max_row_group_bytes=2 * MIB) == (BOMB_DOCS, 1)
    configure_row_group_limits(max_bytes=2 * MIB)
    with pytest.raises(CorruptShardError, match=r"row group 0 decodes to more than 2,097,152 bytes .*"
                                                r"its footer declares 1,100,000"):
        _read_texts(_open_parquet(liar), 0, liar)


def test_a_local_folder_with_a_bomb_stops_the_document_stream(sample_dir, bomb, tmp_path):
    d = tmp_path / "local"
    d.mkdir()
    shutil.copy(sample_dir / "shard_00000.parquet", d / "shard_00000.parquet")
    shutil.copy(bomb, d / "shard_00001.parquet")
    shutil.copy(sample_dir / "shard_00005.parquet", d / "shard_00002.parquet")     # the val shard
    configure_row_group_limits(max_bytes=MIB)
    plan = ShardPlan("train", data_dir=d)
    seen = set()
    with pytest.raises(CorruptShardError, match=r"shard_00001\.parquet: row group 0 declares .* over the cap"):
        for _, (epoch, pq_idx, rg_idx, row), _ in iter_doc_batches(plan, (1, 0, 0, 0), 0, 1, 256):
            seen.add(pq_idx)
    assert seen == {0}          # shard 0 (genuine, under the cap) was read in full first
