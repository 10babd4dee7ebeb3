"""`shardstream plan` and the simulation under it: the downloader's scheduler on a simulated clock.

No sockets, no sleeps: every figure here is computed (simulate.py drives schedule.py and prefetch.py), so
each test checks the planner against what the rules and the arithmetic say it must give."""
import json
import time

import pytest

from shardstream.plan import cli
from shardstream.shards import shard_name
from shardstream.simulate import MB, Link, Scenario, download_everything_first, simulate, simulate_node

KEYS = ("first_step_s", "wait_fraction", "peak_disk_bytes", "wire_bytes", "window_max")
BASE = ["--shards", "20", "--shard-mb", "100", "--link-mb-per-s", "100", "--consume-mb-per-s", "2",
        "--budget-mb", "2000"]


def run_json(capsys, argv):
    assert cli(argv + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


def sc(shards=20, shard_mb=100, w=100.0, r=2.0, budget_mb=2000, link=None, **kw):
    return Scenario.uniform(shards, shard_mb, w, r, budget_mb, link=link, **kw)


# -----------------------------------------------------------------------------
# the command

def test_prints_a_row_per_node_and_the_worst(capsys):
    assert cli(BASE + ["--nodes", "2", "--partition", "node"]) == 0
    out = capsys.readouterr().out
    assert "first step" in out and "wait %" in out and "peak disk" in out and "wire" in out and "window" in out
    assert "worst node" in out and "partition node" in out


def test_json_has_the_keys_at_top_level_and_per_node(capsys):
    obj = run_json(capsys, BASE + ["--nodes", "3", "--partition", "node"])
    for k in KEYS:
        assert k in obj
        assert all(k in n for n in obj["nodes"])
    assert len(obj["nodes"]) == 3
    worst = max(obj["nodes"], key=lambda n: (n["wait_fraction"], n["first_step_s"]))
    assert obj["wait_fraction"] == worst["wait_fraction"] and obj["first_step_s"] == worst["first_step_s"]


def test_tokens_per_second_is_the_same_consumption(capsys):
    a = run_json(capsys, BASE)
    argv = [x for x in BASE]
    i = argv.index("--consume-mb-per-s")
    argv[i:i + 2] = ["--tokens-per-s", "1000000", "--tokens-per-mb", "500000"]      # R = 2 MB/s
    b = run_json(capsys, argv)
    assert a["wall_s"] == pytest.approx(b["wall_s"]) and a["wire_bytes"] == b["wire_bytes"]


@pytest.mark.parametrize("change, flag", [
    (("--link-mb-per-s", "-5"), "--link-mb-per-s"),
    (("--consume-mb-per-s", "-1"), "--consume-mb-per-s"),
    (("--consume-mb-per-s", "0"), "--consume-mb-per-s"),
    (("--shards", "0"), "--shards"),
    (("--shard-mb", "0"), "--shard-mb"),
    (("--budget-mb", "250"), "--budget-mb"),          # val + two shards = 300 MB
    (("--budget-mb", "-1"), "--budget-mb"),
])
def test_bad_inputs_are_exit_2_naming_the_flag(capsys, change, flag):
    argv = list(BASE)
    i = argv.index(change[0])
    argv[i + 1] = change[1]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and flag in err


@pytest.mark.parametrize("extra, flag", [
    (["--outage", "soon"], "--outage"),
    (["--outage", "10:-5"], "--outage"),
    (["--jitter", "1.5"], "--jitter"),
    (["--nodes", "0"], "--nodes"),
    (["--nodes", "30", "--partition", "node"], "--nodes"),     # 20 shards cannot go to 30 nodes
    (["--tokens-per-s", "5"], "--tokens-per-s"),               # beside --consume-mb-per-s
    (["--window", "lots"], "--window"),
])
def test_more_bad_inputs(capsys, extra, flag):
    assert cli(BASE + extra) == 2
    assert flag in capsys.readouterr().err


def test_a_malformed_number_is_argparses_exit_2(capsys):
    argv = list(BASE)
    argv[argv.index("--shards") + 1] = "many"
    assert cli(argv) == 2
    assert "--shards" in capsys.readouterr().err


def test_source_reads_sizes_from_a_local_listing(capsys, sample_dir):
    sizes = sorted((p.name, p.stat().st_size) for p in sample_dir.glob("shard_*.parquet"))
    total = sum(s for _, s in sizes)
    obj = run_json(capsys, ["--source", str(sample_dir), "--link-mb-per-s", "50", "--consume-mb-per-s", "1",
                            "--budget-mb", "10"])
    assert obj["scenario"]["train_shards"] == len(sizes) - 1
    assert obj["scenario"]["shard_bytes_total"] == total
    assert obj["wire_bytes"] == total                      # every train shard and the val shard, once
    two = run_json(capsys, ["--source", str(sample_dir), "--shards", "2", "--link-mb-per-s", "50",
                            "--consume-mb-per-s", "1", "--budget-mb", "10"])
    assert two["wire_bytes"] == sizes[0][1] + sizes[1][1] + sizes[-1][1]
    assert sizes[-1][0] == shard_name(len(sizes) - 1)


def test_png_draws_the_timeline(capsys, tmp_path):
    png = tmp_path / "plan.png"
    assert cli(["--shards", "8", "--shard-mb", "100", "--link-mb-per-s", "50", "--consume-mb-per-s", "40",
                "--budget-mb", "600", "--png", str(png)]) == 0
    assert png.stat().st_size > 10_000 and str(png) in capsys.readouterr().out


def test_solve_link_finds_the_smallest_zero_wait_link(capsys):
    argv = ["--shards", "30", "--shard-mb", "100", "--consume-mb-per-s", "10", "--budget-mb", "1000"]
    obj = run_json(capsys, argv + ["--solve", "link"])
    w = obj["value"]
    assert obj["wait_fraction"] == 0 and 10 <= w <= 40
    below = simulate(Scenario.uniform(30, 100, w * 0.95, 10, 1000)).worst
    assert below.wait_fraction > 0


def test_solve_budget(capsys):
    obj = run_json(capsys, ["--shards", "30", "--shard-mb", "100", "--link-mb-per-s", "100",
                            "--consume-mb-per-s", "10", "--solve", "budget"])
    assert obj["wait_fraction"] == 0 and obj["value"] >= 300


# -----------------------------------------------------------------------------
# the figures

def test_first_step_is_one_shards_download_with_a_fast_reader():
    lat = 0.05
    link = Link(100, probe_latency_s=lat)
    # no budget: a worker asks shard 0's size (a HEAD), then fetches it (the GET's first byte after as long)
    r = simulate(Scenario.uniform(10, 100, 100, 1000, None, link=link)).worst
    assert r.first_step_s == pytest.approx(100 / 100 + 2 * lat)
    # a budget: start() asks shard 0's and the val shard's sizes first (the budget check), then the GET
    r = simulate(Scenario.uniform(10, 100, 100, 1000, 2000, link=link)).worst
    assert r.first_step_s == pytest.approx(100 / 100 + 3 * lat)


def test_a_link_much_faster_than_the_reader_never_waits_after_shard_0():
    for partition, nodes in (("global", 1), ("node", 4)):
        r = simulate(sc(shards=40, w=100, r=2, nodes=nodes, partition=partition)).worst
        assert r.wait_fraction == 0 and r.waits == 0
        assert r.window_max >= r.window_last >= 2


@pytest.mark.parametrize("w, r", [(1.0, 2.0), (5.0, 10.0), (3.0, 4.0)])
def test_a_link_slower_than_the_reader_waits_1_minus_w_over_r(w, r):
    res = simulate(sc(shards=60, w=w, r=r, budget_mb=1000)).worst
    assert res.wait_fraction == pytest.approx(1 - w / r, abs=0.03)


@pytest.mark.parametrize("kw", [
    dict(w=1, r=2, budget_mb=300),                      # behind, the tightest budget the downloader takes
    dict(w=100, r=2, budget_mb=350),
    dict(w=100, r=50, budget_mb=400, epochs=3),         # keeps re-read shards while the budget allows
    dict(w=10, r=9, budget_mb=1000, link=Link(10, jitter=0.5), seed=3),
    dict(w=50, r=5, budget_mb=500, window=8),           # a fixed window the budget cannot hold
])
def test_peak_disk_never_exceeds_the_budget(kw):
    sc_ = sc(shards=30, **kw)
    r = simulate_node(sc_, 0, record_events=True)
    assert 0 < r.peak_disk_bytes <= sc_.budget_bytes
    assert max(e["bytes_on_disk"] for e in r.events) <= sc_.budget_bytes
    assert r.failed_at_s is None and r.shards_read == 30 * sc_.epochs


def test_global_and_node_partition_wire_bytes_differ_by_the_nodes():
    k, n, s = 4, 64, 100 * MB
    g = simulate(sc(shards=n, nodes=k, partition="global"))
    p = simulate(sc(shards=n, nodes=k, partition="node"))
    assert all(x.wire_bytes == (n + 1) * s for x in g.nodes)            # every shard and the val shard
    assert all(x.wire_bytes == (n // k + 1) * s for x in p.nodes)       # its quarter and the val shard
    assert (g.total_wire_bytes - k * s) == k * (p.total_wire_bytes - k * s)     # train bytes: k times
    # the same training: a global node trains on 1/k of each shard, so both take as long
    assert g.worst.wall_s == pytest.approx(p.worst.wall_s, rel=0.02)


def test_ranks_in_lockstep_read_like_one_reader():
    one = simulate(sc(shards=30, w=100, r=2)).worst
    eight = simulate(sc(shards=30, w=100, r=2, ranks_per_node=8)).worst
    assert eight.wire_bytes == one.wire_bytes and eight.first_step_s == one.first_step_s
    assert eight.wall_s == pytest.approx(one.wall_s) and eight.wait_fraction == 0


def test_an_outage_longer_than_the_buffer_waits_for_the_rest():
    # 100 MB shards at 1000 MB/s, read at 1 MB/s (100 s each): the adaptive window keeps 2 shards ahead
    lat, t0, outage = 0.01, 1000.5, 1000.0
    link = Link(1000, probe_latency_s=lat, outages=((t0, outage),), retry_gap_s=0)
    r = simulate(Scenario.uniform(30, 100, 1000, 1, None, link=link, failure_mode="wait")).worst
    first = 2 * lat + 0.1
    buffered = first + 13 * 100 - t0           # shard 10 being read, 11 and 12 on disk: read until then
    fetch = 2 * lat + 0.1                      # after it: shard 13's HEAD, GET and bytes
    assert r.window_last == 2 and r.failed_at_s is None
    assert r.wait_s == pytest.approx(outage - buffered + fetch, abs=0.05)
    # the default failure policy: a reader that waited `deadline` s for failing tries gets the error
    r = simulate(Scenario.uniform(30, 100, 1000, 1, None, link=link)).worst
    assert r.failed_at_s == pytest.approx(first + 13 * 100 + 300, abs=0.05)
    assert "failure policy 'fail'" in r.failure


def test_an_outage_shorter_than_the_buffer_costs_nothing():
    link = Link(1000, probe_latency_s=0.01, outages=((1000.5, 150),), retry_gap_s=30)
    r = simulate(Scenario.uniform(30, 100, 1000, 1, None, link=link)).worst
    assert r.wait_fraction == 0 and r.failed_at_s is None


def test_deterministic_for_a_seed():
    link = Link(10, jitter=0.4, outages=((100, 60),))
    a = simulate(sc(shards=40, w=10, r=8, link=link, seed=1, nodes=3, partition="node"))
    b = simulate(sc(shards=40, w=10, r=8, link=link, seed=1, nodes=3, partition="node"))
    c = simulate(sc(shards=40, w=10, r=8, link=link, seed=2, nodes=3, partition="node"))
    assert a.to_json() == b.to_json() and a.to_json() != c.to_json()


def test_events_are_the_downloaders_and_the_timeline_reads_them():
    from shardstream.timeline import summarize
    r = simulate(sc(shards=10, w=50, r=40, budget_mb=600), record_events=True).worst
    kinds = {e["event"] for e in r.events}
    assert {"start", "download_start", "downloaded", "consumed", "evicted"} <= kinds
    s = summarize(list(r.events))
    assert s.downloads == r.downloads == 11 and s.val_shard == 10
    assert s.peak_bytes_on_disk <= r.peak_disk_bytes
    assert s.wait_seconds == pytest.approx(r.wait_s, abs=1e-3)


def test_everything_first_is_the_bytes_over_the_link():
    t = download_everything_first([100 * MB] * 8, Link(100, probe_latency_s=0.05), workers=4)
    assert t == pytest.approx(8 + 2 * 0.05, abs=0.11)


def test_a_full_climbmix_run_simulates_in_seconds():
    t0 = time.perf_counter()
    r = simulate(sc(shards=6543, w=100, r=1.72)).worst
    assert r.shards_read == 6543 and r.wait_fraction == 0
    assert time.perf_counter() - t0 < 30        # ~1-2 s on a quiet core


def test_solve_with_a_wait_allowed_needs_less(capsys):
    argv = ["--shards", "40", "--shard-mb", "100", "--consume-mb-per-s", "10", "--budget-mb", "1000", "--solve", "link"]
    strict = run_json(capsys, argv)
    loose = run_json(capsys, argv + ["--max-wait", "5"])
    assert loose["wait_fraction"] <= 0.05 and loose["value"] < strict["value"]


def test_solve_says_when_nothing_will_do(capsys):
    # a link slower than the reader: no budget removes the wait
    assert cli(["--shards", "20", "--shard-mb", "100", "--link-mb-per-s", "5", "--consume-mb-per-s", "10",
                "--solve", "budget"]) == 1
    assert "no budget gives no data-wait" in capsys.readouterr().out
