"""verify.py: sha256 of files, the parquet footer check, and verify_shard's size/sha256/layout checks."""
import hashlib
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shardstream.errors import CorruptShardError
from shardstream.verify import check_parquet, sha256_file, verify_shard

SHARD = "shard_00000.parquet"


def test_sha256_file_matches_hashlib_and_limit(sample_dir):
    data = (sample_dir / SHARD).read_bytes()
    assert sha256_file(sample_dir / SHARD) == hashlib.sha256(data).hexdigest()
    assert sha256_file(sample_dir / SHARD, limit=12345) == hashlib.sha256(data[:12345]).hexdigest()
    h = hashlib.sha256(b"prefix")
    sha256_file(sample_dir / SHARD, hasher=h)
    assert h.hexdigest() == hashlib.sha256(b"prefix" + data).hexdigest()


def test_check_parquet_accepts_a_sample_shard(sample_dir):
    rows, groups = check_parquet(sample_dir / SHARD)
    assert rows > 0 and rows % 1024 == 0 and groups >= 1


def test_verify_shard_passes_with_the_right_size_and_sha(sample_dir):
    data = (sample_dir / SHARD).read_bytes()
    verify_shard(sample_dir / SHARD, len(data), hashlib.sha256(data).hexdigest())
    verify_shard(sample_dir / SHARD, len(data), hashlib.sha256(data).hexdigest().upper())   # case-blind


def test_verify_shard_rejects_wrong_size_and_sha(sample_dir):
    data = (sample_dir / SHARD).read_bytes()
    with pytest.raises(CorruptShardError, match="bytes on disk"):
        verify_shard(sample_dir / SHARD, len(data) + 1)
    with pytest.raises(CorruptShardError, match="sha256"):
        verify_shard(sample_dir / SHARD, len(data), "0" * 64)
    with pytest.raises(CorruptShardError, match="cannot be read"):
        verify_shard(sample_dir / "missing.parquet")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_check_parquet_rejects_broken_files(sample_dir, tmp_path, damage):
    p = tmp_path / SHARD
    data = (sample_dir / SHARD).read_bytes()
    p.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"PAR1" + b"x" * 5000, "empty": b""}[damage])
    with pytest.raises(CorruptShardError, match="not a readable parquet") as e:
        check_parquet(p)
    assert str(p) in str(e.value)


def test_check_parquet_wants_a_string_text_column(tmp_path):
    p = tmp_path / "no_text.parquet"
    pq.write_table(pa.table({"content": ["a", "b"]}), p)
    with pytest.raises(CorruptShardError, match="no `text` column"):
        check_parquet(p)
    q = tmp_path / "int_text.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), q)
    with pytest.raises(CorruptShardError, match="expected a string column"):
        check_parquet(q)


def test_verify_shard_can_skip_the_parquet_check(sample_dir, tmp_path):
    p = tmp_path / SHARD
    shutil.copy(sample_dir / SHARD, p)
    with open(p, "r+b") as f:          # break the footer magic
        f.seek(-1, 2)
        f.write(b"X")
    verify_shard(p, p.stat().st_size, parquet=False)
    with pytest.raises(CorruptShardError):
        verify_shard(p, p.stat().st_size)
