"""Shared fixtures: a small set of sample shards made once per test session, and a real local server.

    sample_dir   (session)  6 shards shard_00000..shard_00005.parquet, 2 row groups x 1,024 docs each,
                            ~2 M chars (~0.6 MB) per shard, seed 0. Shared by every test: DO NOT modify it;
                            copy it (or use `remote_dir` / `server`) when a test changes files.
    remote_dir   (function) a fresh copy of sample_dir under tmp_path/"remote", free to modify.
    server       (function) a started ShardServer serving remote_dir on 127.0.0.1 (random port), stopped
                            after the test. srv.url / srv.hub_url are the base URLs, srv.directory the files.
"""
import shutil

import pytest

from shardstream.sample import make_sample
from shardstream.server import ShardServer

SAMPLE_SHARDS = 6
SAMPLE_CHARS_PER_SHARD = 2_000_000
SAMPLE_ROW_GROUPS = 2


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("sample")
    make_sample(d, SAMPLE_SHARDS, SAMPLE_CHARS_PER_SHARD, seed=0, row_groups=SAMPLE_ROW_GROUPS)
    return d


@pytest.fixture
def remote_dir(sample_dir, tmp_path):
    d = tmp_path / "remote"
    shutil.copytree(sample_dir, d)
    return d


@pytest.fixture
def server(remote_dir):
    with ShardServer(remote_dir) as srv:
        yield srv


@pytest.fixture(scope="module")
def fineweb(tmp_path_factory):
    """A small FineWeb-like tree (shardstream.sample.make_fineweb_sample), made once per module."""
    from shardstream.sample import make_fineweb_sample
    d = tmp_path_factory.mktemp("fineweb")
    make_fineweb_sample(d, chars_per_file=20_000)
    return d


@pytest.fixture
def tree(fineweb, tmp_path):
    """A fresh copy of the FineWeb-like tree, free to change."""
    d = tmp_path / "fineweb"
    shutil.copytree(fineweb, d)
    return d
