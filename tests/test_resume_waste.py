"""A resume never downloads again what is on disk for it: a shard the loader stopped in the middle of, or
re-read only to rebuild its packing buffer, is handed back unconsumed and stays (retain=0 deletes only
shards read to their end). Real ShardServer, real parquet shards, the real loader."""
import time

import pytest

from nanochat_like import ByteTokenizer
from rel_common import make_shards
from shardstream.downloader import StreamingDownloader
from shardstream.loader import tokenizing_distributed_data_loader_with_state_bos_bestfit as loader_fn
from shardstream.server import ShardServer
from shardstream.shards import shard_name
from shardstream.source import Source
from shardstream.status import read_events

N = 5                                   # train shards; shard N is val


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    d = tmp_path_factory.mktemp("remote")
    make_shards(d, N + 1, chars=60_000)
    return d


def _downloader(srv, data, **kw):
    return StreamingDownloader(N, data_dir=data, source=Source(srv.hub_url, N + 1), buffer_size=1,
                               progress=False, min_free_bytes=0, warn_free_bytes=0, **kw)


def _downloads(data):
    evs = read_events(data)
    start = max(i for i, e in enumerate(evs) if e["event"] == "start")
    return [e["shard"] for e in evs[start:] if e["event"] == "downloaded"]


def test_release_unconsumed_keeps_the_shard_and_consumed_deletes_it(remote, tmp_path):
    with ShardServer(remote) as srv, _downloader(srv, tmp_path / "d") as dl:
        dl.wait_for_shard(0)
        dl.release(0, consumed=False)
        assert (tmp_path / "d" / shard_name(0)).exists()
        assert not [e for e in read_events(tmp_path / "d") if e["event"] == "consumed"]
        dl.wait_for_shard(0)
        dl.release(0)
        assert not (tmp_path / "d" / shard_name(0)).exists(), "retain=0: a shard read to its end goes"


def test_stop_mid_shard_then_resume_downloads_nothing_it_had(remote, tmp_path):
    tok = ByteTokenizer()
    data = tmp_path / "d"
    kw = dict(tokenizer_threads=1, tokenizer_batch_size=4, device="cpu", buffer_size=4, prefetch=1)   # little read-ahead
    with ShardServer(remote) as srv:
        with _downloader(srv, data) as dl:
            gen = loader_fn(tok, 2, 64, "train", streaming_downloader=dl, **kw)
            state = None
            while state is None or state["pq_idx"] < 2:
                _, _, state = next(gen)
            t_last = time.time()
            gen.close()                 # stops mid-shard 2
        mid = state["pq_idx"]
        on_disk = {s for s in range(N + 1) if (data / shard_name(s)).exists()}
        read_ahead = [e["shard"] for e in read_events(data) if e["event"] == "consumed" and e["t"] <= t_last]
        # The loader reads ahead of the batches it yields: it may have read shard `mid` to its end (then it
        # was consumed and rightly deleted). Otherwise it stopped inside it, and the shard must survive.
        assert mid in on_disk or mid in read_ahead, "the shard the loader stopped in was deleted unconsumed"
        with _downloader(srv, data, initial_buffer=0) as dl:
            gen = loader_fn(tok, 2, 64, "train", streaming_downloader=dl, resume_state_dict=state, **kw)
            next(gen)
            got = _downloads(data)
            gen.close()
    assert not set(got) & on_disk, f"downloaded again what was on disk: {sorted(set(got) & on_disk)}"
    needed = {d[1] for d in state["anchor"]["docs"]} | {mid}
    assert set(got) <= needed | {mid + 1, N}, (got, needed)   # at most: the buffer's shards, the window, val
