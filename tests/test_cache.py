"""The on-disk window: the window and eviction choices on hand-made plans, and ShardCache on real files."""
import pytest

from shardstream import layout
from shardstream.cache import ShardCache, ahead_window, choose_evictions
from shardstream.shards import shard_name


# --- ahead_window

def test_window_before_the_reader_starts_is_the_first_shards():
    assert ahead_window(range(10), -1, 3) == [0, 1, 2]


def test_window_follows_the_reader_and_stops_at_the_end():
    assert ahead_window(range(10), 4, 3) == [5, 6, 7]
    assert ahead_window(range(10), 8, 3) == [9]
    assert ahead_window(range(10), 9, 3) == []


def test_window_cycles_into_the_next_epoch_when_asked():
    assert ahead_window(range(5), 3, 3, cycle=True) == [4, 0, 1]
    assert ahead_window(range(2), 0, 5, cycle=True) == [1, 0]       # never longer than the plan


def test_window_over_a_shuffled_plan_uses_plan_positions():
    plan = [7, 3, 9, 1]
    assert ahead_window(plan, 1, 2) == [9, 1]


# --- choose_evictions

def test_consumed_beyond_retain_go_oldest_first():
    entries = {0: 10, 1: 10, 2: 10, 3: 10}
    evict, ok = choose_evictions(entries, consumed=[0, 1, 2], retain=1)
    assert ok and evict == [0, 1]
    evict, _ = choose_evictions(entries, consumed=[0, 1, 2], retain=0)
    assert evict == [0, 1, 2]
    evict, _ = choose_evictions(entries, consumed=[0, 1, 2], retain=5)
    assert evict == []


def test_protected_shards_are_never_evicted():
    entries = {0: 10, 1: 10, 2: 10}
    evict, ok = choose_evictions(entries, protected={0, 2}, consumed=[0, 1, 2], retain=0, need_bytes=25)
    assert evict == [1] and not ok          # 1 is routine; 25 bytes cannot be freed without 0 or 2


def test_pressure_evicts_never_read_again_first_then_furthest():
    entries = {1: 10, 5: 10, 8: 10, 20: 10, 30: 10}
    nxt = {1: None, 5: 2, 8: 5, 20: 17, 30: None}.get
    evict, ok = choose_evictions(entries, next_read=nxt, need_bytes=30)
    assert ok and evict == [30, 1, 20]
    evict, ok = choose_evictions(entries, next_read=nxt, need_bytes=0)
    assert ok and evict == []               # nothing routine, nothing needed


def test_pressure_spares_retained_shards_when_others_suffice():
    entries = {0: 10, 1: 10, 9: 10}
    nxt = {0: None, 1: None, 9: 8}.get
    evict, ok = choose_evictions(entries, consumed=[0, 1], retain=2, next_read=nxt, need_bytes=10)
    assert ok and len(evict) == 1 and evict[0] in (0, 1)    # never-read-again goes before shard 9


def test_unsatisfiable_need_returns_only_routine_deletions():
    entries = {0: 10, 1: 10}
    evict, ok = choose_evictions(entries, consumed=[0], retain=0, next_read=lambda s: None, need_bytes=100)
    assert evict == [0] and not ok


# --- ShardCache on real files

def _write(path, n):
    path.write_bytes(b"x" * n)


def test_scan_counts_final_files_and_partials(tmp_path):
    _write(tmp_path / shard_name(0), 100)
    _write(tmp_path / shard_name(3), 50)
    _write(tmp_path / (shard_name(4) + ".abc123.partial"), 30)
    _write(tmp_path / (shard_name(4) + ".def456.partial"), 5)
    (tmp_path / (shard_name(4) + ".abc123.partial.json")).write_text("{}")
    _write(tmp_path / "notes.txt", 999)
    _write(tmp_path / (shard_name(0) + ".lock"), 0)
    finals, partials = ShardCache(tmp_path).scan()
    assert finals == {0: 100, 3: 50}
    assert partials == {4: 35}


def test_accounting_counts_reservations_until_bytes_arrive(tmp_path):
    c = ShardCache(tmp_path, budget=1000)
    c.files = {0: 300}
    c.partials = {2: 40}
    c.begin(2, 200)                          # the partial's 40 bytes move into the reservation
    assert 2 not in c.partials
    assert c.used_bytes() == 500 and c.disk_bytes() == 340 and c.reserved_bytes() == 160
    c.progress(2, 100)
    assert c.used_bytes() == 500 and c.disk_bytes() == 440
    assert c.fits(500) and not c.fits(501)
    _write(tmp_path / shard_name(2), 200)
    c.finish(2, 200)
    assert c.files == {0: 300, 2: 200} and not c.inflight and c.used_bytes() == 500


def test_abandon_keeps_what_the_partial_file_holds(tmp_path):
    c = ShardCache(tmp_path)
    c.begin(5, 1000)
    _write(tmp_path / (shard_name(5) + ".u1.partial"), 123)
    c.abandon(5)
    assert c.partials == {5: 123} and not c.inflight
    (tmp_path / (shard_name(5) + ".u1.partial")).unlink()
    c.begin(5, 1000)
    c.abandon(5)
    assert c.partials == {}


def test_leases_are_counted_per_reader(tmp_path):
    c = ShardCache(tmp_path)
    c.lease(1, "a")
    c.lease(1, "b")
    c.lease(1, "a")
    assert c.release(1, "a") is False
    assert c.release(1, "b") is False
    assert c.release(1, "b") is None         # b holds no lease any more
    assert c.release(1, "a") is True
    assert list(c.consumed) == [1] and c.leased() == set()


def test_delete_removes_file_and_partials_but_refuses_leased_or_inflight(tmp_path):
    _write(tmp_path / shard_name(1), 10)
    _write(tmp_path / (shard_name(1) + ".zz.partial"), 4)
    (tmp_path / (shard_name(1) + ".zz.partial.json")).write_text("{}")
    c = ShardCache(tmp_path)
    c.files, c.partials = c.scan()
    c.lease(1, 0)
    with pytest.raises(RuntimeError, match="reader holds"):
        c.delete(1)
    assert (tmp_path / shard_name(1)).exists()
    c.release(1, 0)
    assert c.delete(1) == 14
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != layout.BOOK_DIR) == []
    assert not list(layout.book_dir(tmp_path).iterdir())            # its .lease file went with it
    c.begin(2, 10)
    with pytest.raises(RuntimeError, match="being downloaded"):
        c.delete(2)


def test_lease_and_lock_files_pile_up_neither_in_the_inventory_nor_on_delete(tmp_path):
    _write(tmp_path / shard_name(3), 10)
    for name in (shard_name(3) + ".lock", shard_name(5) + ".lock", shard_name(5) + ".lease",
                 ".shardstream-write-test.123.abcd1234", "status.json", "events.jsonl"):
        (tmp_path / name).write_text("")
    c = ShardCache(tmp_path)
    assert c.scan() == ({3: 10}, {})                  # only the shard file counts
    c.files = {3: 10}
    c.lease(3, 0)
    c.release(3, 0)
    assert c.delete(3) == 10
    left = sorted(p.name for p in tmp_path.iterdir())
    assert shard_name(3) + ".lease" not in left and shard_name(3) + ".lock" in left     # fetch's lock stays


def test_a_lock_taken_on_a_removed_lease_file_is_not_trusted(tmp_path):
    import os
    from shardstream.cache import _is_current
    lease = tmp_path / (shard_name(4) + ".lease")
    lease.write_text("")
    fd = os.open(lease, os.O_RDWR)                    # opened (and then locked) before a delete removed it
    assert _is_current(fd, lease)
    lease.unlink()
    assert not _is_current(fd, lease)                 # gone: lease() and try_lock start over
    lease.write_text("")
    assert not _is_current(fd, lease)                 # another process's new file is another lock
    os.close(fd)


def test_deleting_orphan_partials_leaves_the_fetch_lock_free(tmp_path):
    """The probe of fetch's lock before deleting a partial releases it again: a fetch of that shard in
    this process or another must be able to take it afterwards."""
    import filelock
    lock = layout.lock_path(tmp_path, 5)
    lock.parent.mkdir()
    lock.write_text("")
    (tmp_path / (shard_name(5) + ".abc.partial")).write_bytes(b"x" * 7)
    c = ShardCache(tmp_path)
    files, partials = c.scan()
    assert partials == {5: 7}
    c.partials = partials
    assert c.delete(5) == 7
    assert not list(tmp_path.glob("*.partial"))
    with filelock.FileLock(lock, timeout=1):            # raises Timeout if delete() kept the lock
        pass
