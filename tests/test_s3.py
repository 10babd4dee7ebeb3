"""s3:// sources against a real S3-compatible server on 127.0.0.1 (moto in server mode, started here):
listing and discovery, download, resume after a reset, ETag pinning, budget through the
StreamingDownloader, `shardstream ls`. Every test gets a fresh bucket holding the sample shards.
"""
import hashlib
import importlib.util
import logging
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

s3fs = pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")

from shardstream.downloader import DiskPolicy, FailurePolicy, StreamingDownloader  # noqa: E402
from shardstream.errors import ConfigError, FetchCancelled, PermanentFetchError  # noqa: E402
from shardstream.fetch import FetchPolicy, fetch_shard, remote_info  # noqa: E402
from shardstream.shards import shard_name  # noqa: E402
from shardstream.listing import make_source  # noqa: E402
from rel_common import shard_bytes_on_disk  # noqa: E402

CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
FAST = FetchPolicy(connect_timeout=2, stall_timeout=5, max_attempts=3, backoff_initial=0.01, backoff_max=0.05,
                   chunk_bytes=16384, fsync=False)     # 128 KiB ranged reads: a ~0.6 MB shard takes several


@pytest.fixture(scope="module")
def endpoint():
    with pytest.MonkeyPatch.context() as mp:
        for k, v in CREDS.items():
            mp.setenv(k, v)
        server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()


@pytest.fixture
def s3(endpoint):
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


@pytest.fixture
def bucket(s3, sample_dir):
    """A fresh bucket with the sample shards under corpus/ (plus a file that is not a shard)."""
    name = f"b-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    for p in sorted(sample_dir.glob("shard_*.parquet")):
        s3.put_object(Bucket=name, Key=f"corpus/{p.name}", Body=p.read_bytes())
    s3.put_object(Bucket=name, Key="corpus/README.md", Body=b"not a shard")
    return name


def opts(endpoint):
    return {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}


def source_for(bucket, endpoint, **kw):
    return make_source(f"s3://{bucket}/corpus", storage_options=opts(endpoint), **kw)


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_listing_gives_count_sizes_etags_and_a_revision(bucket, endpoint, sample_dir):
    src = source_for(bucket, endpoint)
    assert src.kind == "s3" and src.dataset_shards == 6 and src.val_shard == 5     # discovered, not typed
    for i, info in enumerate(src.listing):
        data = (sample_dir / shard_name(i)).read_bytes()
        assert info.size == len(data)
        assert info.etag.strip('"') == hashlib.md5(data).hexdigest()               # moto: single-part ETag
    ident = src.identity()
    assert ident["source"].startswith(f"s3://{bucket}/corpus@etags-") and ident["dataset_shards"] == 6
    assert make_source(f"s3://{bucket}/corpus/", storage_options=opts(endpoint)).identity() == ident
    assert source_for(bucket, endpoint, dataset_shards=4).dataset_shards == 4
    with pytest.raises(ConfigError, match="dataset_shards=7 but"):
        source_for(bucket, endpoint, dataset_shards=7)


def test_download_verifies_size_md5_and_parquet(bucket, endpoint, sample_dir, tmp_path):
    src = source_for(bucket, endpoint)
    info = remote_info(src, 2, FAST)
    assert info.size == (sample_dir / shard_name(2)).stat().st_size
    assert info.md5 == hashlib.md5((sample_dir / shard_name(2)).read_bytes()).hexdigest()
    r = fetch_shard(src, 2, tmp_path / "data", FAST, info=info)
    assert r.path.read_bytes() == (sample_dir / shard_name(2)).read_bytes()
    assert r.sha256 == sha256(r.path) and r.bytes_downloaded == info.size and r.resumed_from == 0
    assert not list((tmp_path / "data").glob("*.partial*"))
    assert fetch_shard(src, 2, tmp_path / "data", FAST).already_present


def test_resume_after_a_cancelled_transfer_reads_only_the_rest(bucket, endpoint, sample_dir, tmp_path):
    src = source_for(bucket, endpoint)
    data = tmp_path / "data"
    size = src.listing[1].size
    stop = threading.Event()
    got = []

    def on_bytes(n):                    # cut the transfer after its second block
        got.append(n)
        if len(got) == 2:
            stop.set()

    with pytest.raises(FetchCancelled):
        fetch_shard(src, 1, data, FAST, stop=stop, on_bytes=on_bytes)
    [partial] = data.glob("shard_00001.parquet.*.partial")
    have = partial.stat().st_size
    assert 0 < have < size and have == sum(got)
    r = fetch_shard(src, 1, data, FAST)
    assert r.resumed_from == have and r.bytes_downloaded == size - have
    assert r.path.read_bytes() == (sample_dir / shard_name(1)).read_bytes()


def test_resume_after_a_connection_reset_mid_body(bucket, endpoint, sample_dir, tmp_path, caplog, monkeypatch):
    """A proxy resets the connection twice, each time 300 KB into it (mid-way through the third 128 KiB
    read); s3fs's own retries are off, so fetch's retry resumes from the blocks already on disk."""
    caplog.set_level(logging.INFO, "shardstream")
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)       # s3fs's setting (a class attribute)
    with _ResettingProxy(endpoint, reset_after=300_000, resets=2) as proxy:
        src = make_source(f"s3://{bucket}/corpus", storage_options=opts(proxy.url))
        r = fetch_shard(src, 0, tmp_path / "data", FAST)
    assert proxy.resets_done == 2
    resumes = [int(m) for m in re.findall(r"resuming at byte (\d+)", caplog.text)]
    assert len(resumes) == 2 and resumes[0] > 0 and resumes[0] % (16384 * 8) == 0      # whole blocks kept
    assert r.bytes_downloaded == r.size                                                 # nothing read twice
    assert r.path.read_bytes() == (sample_dir / shard_name(0)).read_bytes()


def test_changed_object_is_refused_and_changes_the_identity(bucket, endpoint, s3, sample_dir, tmp_path):
    src = source_for(bucket, endpoint)
    s3.put_object(Bucket=bucket, Key="corpus/shard_00003.parquet",
                  Body=(sample_dir / shard_name(4)).read_bytes())            # a new version of shard 3
    with pytest.raises(PermanentFetchError, match="changed since this run started.*shard_00003.parquet had"):
        fetch_shard(src, 3, tmp_path / "data", FAST)
    with pytest.raises(PermanentFetchError, match="changed since this run started"):
        remote_info(src, 3, FAST)
    assert not (tmp_path / "data" / shard_name(3)).exists()
    fetch_shard(src, 0, tmp_path / "data", FAST)                              # unchanged shards still come
    assert source_for(bucket, endpoint).identity() != src.identity()


def test_gap_in_the_listing_and_missing_things_are_clear(bucket, endpoint, s3, tmp_path):
    src = source_for(bucket, endpoint)
    s3.delete_object(Bucket=bucket, Key="corpus/shard_00002.parquet")
    with pytest.raises(PermanentFetchError, match="shard 00002 .*the object does not exist at this source"):
        fetch_shard(src, 2, tmp_path / "data", FAST)
    with pytest.raises(ConfigError, match="lacks shard_00002.parquet.*dataset_shards=2"):
        source_for(bucket, endpoint)
    assert source_for(bucket, endpoint, dataset_shards=2).dataset_shards == 2
    with pytest.raises(ConfigError, match="nothing-here': no such folder"):
        make_source(f"s3://{bucket}/nothing-here", storage_options=opts(endpoint))
    s3.put_object(Bucket=bucket, Key="docs/README.md", Body=b"no shards here")
    with pytest.raises(ConfigError, match="holds no shard_XXXXX.parquet files \\(listed 1 other"):
        make_source(f"s3://{bucket}/docs", storage_options=opts(endpoint))
    if importlib.util.find_spec("gcsfs") is None:      # not a dev dependency: the error names the extra
        with pytest.raises(ConfigError, match=r"needs gcsfs: pip install 'shardstream\[gcs\]'"):
            make_source("gs://some-bucket/corpus")


def test_streaming_downloader_stays_in_budget(bucket, endpoint, sample_dir, tmp_path):
    src = source_for(bucket, endpoint)
    sizes = [info.size for info in src.listing]
    budget = sizes[5] + 2 * max(sizes) + max(sizes) // 2          # val + 2.5 shards: the budget binds
    data = tmp_path / "data"
    peak, done = [0], threading.Event()

    def sampler():
        while not done.is_set():
            peak[0] = max(peak[0], shard_bytes_on_disk(data))
            time.sleep(0.005)

    with StreamingDownloader(5, buffer_size=4, data_dir=data, source=src, max_cache_bytes=budget,
                             fetch_policy=FAST, disk_policy=DiskPolicy(warn_free_bytes=0, min_free_bytes=0),
                             failure_policy=FailurePolicy("fail", deadline=30), progress=False) as dl:
        t = threading.Thread(target=sampler)
        t.start()
        try:
            for i in range(5):
                p = dl.wait_for_shard(i, timeout=30)
                assert p.read_bytes() == (sample_dir / shard_name(i)).read_bytes()
                dl.release(i)
        finally:
            done.set()
            t.join()
    assert 0 < peak[0] <= budget


def test_ls_command_lists_shards_and_total(bucket, endpoint, sample_dir):
    env = {**os.environ, **CREDS, "AWS_ENDPOINT_URL": endpoint}        # the usual variables, no options
    out = subprocess.run([sys.executable, "-m", "shardstream", "ls", f"s3://{bucket}/corpus"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    sizes = [(sample_dir / shard_name(i)).stat().st_size for i in range(6)]
    lines = out.stdout.splitlines()
    assert lines[0].startswith(f"s3://{bucket}/corpus@etags-") and "6 shards (5 train + val shard_00005" in lines[0]
    for i in range(6):
        assert any(line.startswith(shard_name(i)) and f"{sizes[i]:,}" in line for line in lines)
    assert lines[-1].startswith(f"total {sum(sizes):,} bytes")


# -----------------------------------------------------------------------------

class _ResettingProxy:
    """TCP proxy to `target` that resets (RST) the connection whose response bytes take the total that
    went through it past reset_after, then again reset_after bytes later: `resets` times in all."""

    def __init__(self, target, reset_after, resets):
        host, port = target.split("://")[1].split(":")
        self.target = (host, int(port))
        self.reset_after, self.resets_left, self.resets_done = reset_after, resets, 0
        self.passed, self.next_cut = 0, reset_after
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.closing = False

    def __enter__(self):
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.closing = True
        self.listener.close()

    def _accept(self):
        while not self.closing:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, src, dst, response):
        # Short timeouts: a socket closed here is really closed (RST sent) only once the other
        # direction's thread is out of its recv on it.
        src.settimeout(0.05)
        try:
            while True:
                try:
                    data = src.recv(65536)
                except socket.timeout:
                    continue
                if not data:
                    break
                cut = None
                if response:
                    with self.lock:
                        if self.resets_left and self.passed + len(data) >= self.next_cut:
                            cut = self.next_cut - self.passed
                            self.resets_left -= 1
                            self.resets_done += 1
                            self.next_cut += self.reset_after
                        self.passed += len(data) if cut is None else cut
                if cut is not None:
                    dst.sendall(data[:cut])
                    for s in (dst, src):
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        s.close()
                    return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
