"""Eviction by the known read order: ReadPlan on hand-made plans, Belady's choice (multi-epoch, leases,
the window, the horizon), and a real downloader over 3 epochs of a dataset larger than its budget."""
import pytest

from shardstream.cache import ReadPlan, ahead_window, choose_evictions
from shardstream.downloader import DiskPolicy, StreamingDownloader
from shardstream.errors import ConfigError
from shardstream.fetch import FetchPolicy
from shardstream.sample import make_sample
from shardstream.server import ShardServer
from shardstream.shards import shard_name
from shardstream.source import Source

# --- ReadPlan


def test_sequential_and_node_partitioned_plans():
    assert ReadPlan.sequential(5).order == (0, 1, 2, 3, 4)
    assert ReadPlan.sequential(10, node=1, nodes=3).order == (1, 4, 7)
    p = ReadPlan.sequential(4, epochs=3)
    assert p.length == 12 and p.epoch_length == 4
    assert [p.at(k) for k in (0, 3, 4, 11, 12, -1)] == [0, 3, 0, 3, None, None]
    assert ReadPlan.sequential(4, epochs=None).at(10**6 + 1) == 1
    assert 3 in p and 4 not in p and p.index(2) == 2 and p.index(9) is None


def test_next_read_looks_into_later_epochs_until_the_plan_ends():
    p = ReadPlan((7, 3, 9), epochs=2)           # positions: 7@0 3@1 9@2 7@3 3@4 9@5
    assert p.next_read(3, -1) == 2              # not started: its first read at position 1
    assert p.next_read(7, 0) == 3               # just read: next epoch
    assert p.next_read(9, 1) == 1
    assert p.next_read(7, 3) is None            # the last epoch's read is behind: never again
    assert p.next_read(5, 0) is None            # not in the plan
    assert ReadPlan((7, 3, 9), epochs=None).next_read(7, 300) == 3


def test_locate_picks_the_read_nearest_the_reader():
    p = ReadPlan.sequential(5, epochs=3)
    assert p.locate(0, near=-1) == 0            # a fresh reader starts at the first epoch
    assert p.locate(0, near=4) == 5             # moving on from the last shard: the next epoch
    assert p.locate(0, near=7) == 5             # going back (a resume re-reading shard 0): this epoch
    assert p.locate(3, near=6) == 8             # skipping ahead: the nearer read
    assert p.locate(2, near=14) == 12           # the last epoch; nothing after it
    assert p.locate(6, near=0) is None


def test_ahead_spans_epochs_but_never_holds_a_shard_twice():
    p = ReadPlan.sequential(4, epochs=2)
    assert p.ahead(2, 3) == [3, 0, 1]
    assert p.ahead(6, 3) == [3]                 # the plan ends
    assert ReadPlan.sequential(3, epochs=None).ahead(1, 10) == [2, 0, 1]
    assert ahead_window(p, 2, 3) == [3, 0, 1] and ahead_window(p, 2, 0) == []


@pytest.mark.parametrize("kw, needle", [
    (dict(order=()), "at least one"),
    (dict(order=(1, 1)), "duplicates"),
    (dict(order=(1, -2)), "shard ids"),
    (dict(order=(1,), epochs=0), "epochs"),
])
def test_bad_plans_are_refused(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        ReadPlan(**kw)


def test_a_node_with_no_shards_is_refused():
    with pytest.raises(ConfigError, match="gets no shard"):
        ReadPlan.sequential(2, node=2, nodes=3)
    with pytest.raises(ConfigError, match="node must be"):
        ReadPlan.sequential(2, node=3, nodes=3)


# --- Belady on hand-made multi-epoch plans

PLAN = ReadPlan.sequential(6, epochs=3)       # 6 shards read 3 times


def nxt(cursor):
    return lambda s: PLAN.next_read(s, cursor)


def test_consumed_shards_a_later_epoch_reads_stay_while_the_budget_allows():
    entries = {0: 10, 1: 10, 2: 10, 3: 10, 5: 10}
    evict, ok = choose_evictions(entries, consumed=[0, 1, 2, 3], next_read=nxt(4), keep_rereads=True)
    assert ok and evict == []                   # nothing is needed yet: keep them all for epoch 2
    evict, _ = choose_evictions(entries, consumed=[0, 1, 2, 3], next_read=nxt(4), keep_rereads=False)
    assert evict == [0, 1, 2, 3]                # delete-on-consume


def test_under_pressure_the_shard_read_furthest_away_goes_first():
    entries = {0: 10, 1: 10, 2: 10, 3: 10}
    # reader at position 4 (shard 4, epoch 1); next reads: 0@6, 1@7, 2@8, 3@9
    evict, ok = choose_evictions(entries, consumed=[0, 1, 2, 3], next_read=nxt(4), keep_rereads=True,
                                 protected={5}, need_bytes=20)
    assert ok and evict == [3, 2]               # 3 and 2 are read last; 0 and 1 stay for the next epoch


def test_in_the_last_epoch_consumed_shards_go_at_once():
    evict, ok = choose_evictions({0: 10, 1: 10}, consumed=[0, 1], next_read=nxt(14), keep_rereads=True)
    assert ok and evict == [0, 1]               # position 14 is epoch 2 (the last): never read again


def test_leased_and_window_shards_are_never_chosen_even_when_read_furthest():
    entries = {0: 10, 1: 10, 3: 10, 4: 10}
    # reader at position 2 holds shard 2 and 3 (protected: leased), window = [3, 4]
    evict, ok = choose_evictions(entries, consumed=[0, 1], next_read=nxt(2), keep_rereads=True,
                                 protected={2, 3, 4}, need_bytes=10)
    assert ok and evict == [1]                  # 1 is read at 7, 0 at 6: 1 goes
    evict, ok = choose_evictions(entries, consumed=[0, 1], next_read=nxt(2), keep_rereads=True,
                                 protected={2, 3, 4}, need_bytes=30)
    assert not ok and evict == []               # only the leased/window shards could free 30


def test_nothing_read_before_the_incoming_shard_is_evicted_for_it():
    entries = {0: 10, 1: 10}
    # reader at 4: 0 is read 2 positions later, 1 is read 3 later. A shard read 7 later must not push
    # out shards read before it (that would only cost a download); the horizon says so.
    evict, ok = choose_evictions(entries, consumed=[0, 1], next_read=nxt(4), keep_rereads=True,
                                 need_bytes=10, horizon=7)
    assert not ok and evict == []
    evict, ok = choose_evictions(entries, consumed=[0, 1], next_read=nxt(4), keep_rereads=True,
                                 need_bytes=10, horizon=2)
    assert ok and evict == [1]                  # 1 is read after the incoming shard: it may go


def test_never_read_again_goes_before_anything_the_plan_still_needs():
    entries = {0: 10, 9: 10, 2: 10}             # 9 is not in the plan (an on-demand shard)
    evict, ok = choose_evictions(entries, next_read=nxt(4), keep_rereads=True, need_bytes=10)
    assert ok and evict == [9]


# --- the downloader over several epochs, against a real server

N = 12


@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("remote")
    make_sample(d, N + 1, 100_000, seed=5, docs_per_row_group=16, row_groups=2)
    return d


def _walk(srv, shards_dir, tmp_path, plan, epochs, budget):
    fetch = FetchPolicy(fsync=False, connect_timeout=5, stall_timeout=10, backoff_initial=0.02, backoff_max=0.1)
    kw = dict(source=Source(srv.url, N + 1), max_cache_bytes=budget, buffer_size=2, fetch_policy=fetch,
              disk_policy=DiskPolicy(0, 0), progress=False, plan=plan)
    peak = 0
    with StreamingDownloader(data_dir=tmp_path, **kw) as dl:
        for _ in range(epochs):
            for i in range(N):
                dl.wait_for_shard(i, timeout=30)
                dl.release(i)
                st = dl.get_status()
                peak = max(peak, st.bytes_on_disk + st.reserved_bytes)
        st = dl.get_status()
    return st, peak


def test_three_epochs_download_less_with_the_plan_than_delete_on_consume(shards_dir, tmp_path):
    sizes = {i: (shards_dir / shard_name(i)).stat().st_size for i in range(N + 1)}
    big = max(sizes.values())
    budget = sizes[N] + int(N / 1.5) * big      # the train shards are 1.5x what the budget holds
    with ShardServer(shards_dir) as srv:
        aware, peak_a = _walk(srv, shards_dir, tmp_path / "belady", ReadPlan.sequential(N, epochs=3), 3, budget)
        sent_aware = sum(srv.stats(shard_name(i)).bytes_sent for i in range(N))
        srv.reset_stats()
        blind, peak_b = _walk(srv, shards_dir, tmp_path / "blind", ReadPlan.sequential(N, epochs=1), 3, budget)
        sent_blind = sum(srv.stats(shard_name(i)).bytes_sent for i in range(N))
    train = sum(sizes[i] for i in range(N))
    assert sent_blind >= 2.9 * train            # delete-on-consume fetches every epoch again
    assert sent_aware <= 2.0 * train            # epochs 2 and 3 find a good part of the data on disk
    assert peak_a <= budget and peak_b <= budget
    assert aware.failures == blind.failures == 0


def test_a_node_partitioned_plan_fetches_only_that_nodes_shards(shards_dir, tmp_path):
    with ShardServer(shards_dir) as srv:
        plan = ReadPlan.sequential(N, node=1, nodes=3)
        with StreamingDownloader(source=Source(srv.url, N + 1), data_dir=tmp_path, plan=plan, buffer_size=2,
                                 disk_policy=DiskPolicy(0, 0), progress=False) as dl:
            assert dl.total_shards == 4
            for i in plan.order:
                dl.wait_for_shard(i, timeout=30, reader="rank0")
                dl.release(i, reader="rank0")
            assert dl.get_status().shards_verified == 4
        got = {i for i in range(N) if srv.stats(shard_name(i)).get_requests}
    assert got == {1, 4, 7, 10}


@pytest.mark.parametrize("kw, needle", [
    (dict(plan=[0, 1]), "plan must be a ReadPlan"),
    (dict(plan=ReadPlan((0, N))), "names shard 12"),
    (dict(plan=ReadPlan.sequential(4), total_shards=5), "disagrees"),
])
def test_bad_plans_for_the_downloader_are_refused(tmp_path, kw, needle):
    with pytest.raises(ConfigError, match=needle):
        StreamingDownloader(data_dir=tmp_path, source=Source("http://127.0.0.1:9", N + 1), **kw)
