"""ShardServer over real loopback HTTP: bodies, headers, Range, safety, counters, faults, outage, rate cap."""
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests

from shardstream.errors import ConfigError
from shardstream.server import Fault, ShardServer, cli, parse_faults

NAME = "shard_00001.parquet"


def raw_get(srv, path, method="GET", headers=None, timeout=5.0):
    """One request on a fresh socket, read to the end. Returns (status, headers, body, ending) where
    ending is 'eof' (orderly close), 'reset' (TCP RST) or 'timeout' (no byte for `timeout` s)."""
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=timeout)
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    data, ending = bytearray(), "eof"
    try:
        while chunk := sock.recv(1 << 20):
            data += chunk
    except ConnectionResetError:
        ending = "reset"
    except socket.timeout:
        ending = "timeout"
    finally:
        sock.close()
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    if not head:
        return None, {}, b"", ending
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    hdrs = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    return int(status_line.split()[1]), hdrs, body, ending


@pytest.fixture
def data(server):
    return (server.directory / NAME).read_bytes()


# --- plain serving

def test_get_is_byte_identical_on_both_paths(server, data):
    for base in (server.url, server.hub_url):
        r = requests.get(f"{base}/{NAME}")
        assert r.status_code == 200 and r.content == data
        assert r.headers["Content-Length"] == str(len(data))


def test_head_carries_hub_headers(server, data):
    sha = hashlib.sha256(data).hexdigest()
    r = requests.head(f"{server.hub_url}/{NAME}")
    assert r.status_code == 200 and r.content == b""
    assert r.headers["X-Linked-Size"] == str(len(data))
    assert r.headers["X-Linked-Etag"] == f'"{sha}"'
    assert r.headers["ETag"] == f'"{sha}"'
    assert r.headers["Content-Length"] == str(len(data))
    assert r.headers["Accept-Ranges"] == "bytes"
    plain = requests.head(f"{server.url}/{NAME}")
    assert plain.headers["ETag"] == f'"{sha}"' and "X-Linked-Size" not in plain.headers
    assert server.hub_url == f"{server.url}/datasets/karpathy/climbmix-400b-shuffle/resolve/main"


def test_etag_follows_the_file(server, data):
    path = server.directory / NAME
    before = requests.head(f"{server.url}/{NAME}").headers["ETag"]
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    os.utime(path, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    after = requests.head(f"{server.url}/{NAME}").headers["ETag"]
    assert before != after == f'"{hashlib.sha256(path.read_bytes()).hexdigest()}"'


def test_range_requests(server, data):
    size = len(data)
    url = f"{server.url}/{NAME}"
    cases = {"bytes=100-199": (100, 200), "bytes=1000-": (1000, size), "bytes=-500": (size - 500, size),
             f"bytes=10-{size + 99}": (10, size)}
    for rng, (a, b) in cases.items():
        r = requests.get(url, headers={"Range": rng})
        assert r.status_code == 206, rng
        assert r.headers["Content-Range"] == f"bytes {a}-{b - 1}/{size}"
        assert r.headers["Content-Length"] == str(b - a)
        assert r.content == data[a:b]
    r = requests.get(url, headers={"Range": f"bytes={size}-"})
    assert r.status_code == 416 and r.headers["Content-Range"] == f"bytes */{size}"
    # If-Range with a stale etag: the whole file, not a range
    r = requests.get(url, headers={"Range": "bytes=100-", "If-Range": '"stale"'})
    assert r.status_code == 200 and r.content == data
    r = requests.get(url, headers={"Range": "bytes=100-", "If-Range": r.headers["ETag"]})
    assert r.status_code == 206 and r.content == data[100:]


def test_missing_files_and_other_repos_are_404(server):
    assert requests.get(f"{server.url}/shard_09999.parquet").status_code == 404
    assert requests.get(f"{server.url}/datasets/someone/else/resolve/main/{NAME}").status_code == 404
    assert requests.head(f"{server.hub_url}/shard_09999.parquet").status_code == 404


def test_path_traversal_is_refused(server):
    secret = server.directory.parent / "secret.txt"
    secret.write_text("do not serve me")
    hub = "/datasets/karpathy/climbmix-400b-shuffle/resolve/main"
    for path in ("/../secret.txt", "/%2e%2e/secret.txt", "/..%2fsecret.txt", f"{hub}/../secret.txt",
                 f"{hub}/%2e%2e%2fsecret.txt", "//" + str(secret)):
        status, _, body, _ = raw_get(server, path)
        assert status in (403, 404), path
        assert b"do not serve me" not in body


def test_counters_and_request_log(server, data):
    url = f"{server.hub_url}/{NAME}"
    requests.head(url)
    requests.get(url, headers={"Authorization": "Bearer tok-123"})
    requests.get(url, headers={"Range": "bytes=10-19"})
    s = server.stats(NAME)
    assert (s.requests, s.get_requests, s.head_requests) == (3, 2, 1)
    assert s.bytes_sent == len(data) + 10
    assert s.ranges == [(0, len(data)), (10, 20)]
    assert server.stats("shard_00000.parquet").requests == 0
    log = [r for r in server.requests if r.path.endswith(NAME)]
    assert [(r.method, r.status) for r in log] == [("HEAD", 200), ("GET", 200), ("GET", 206)]
    assert log[1].headers.get("Authorization") == "Bearer tok-123"
    assert "Authorization" not in log[0].headers
    server.reset_stats()
    assert server.stats(NAME).requests == 0 and server.requests == []


def test_stats_endpoint(server, data):
    requests.get(f"{server.url}/{NAME}")
    r = requests.get(f"{server.url}/_stats")
    assert r.status_code == 200
    js = r.json()
    assert js["files"][NAME]["bytes_sent"] == len(data)
    assert js["files"][NAME]["get_requests"] == 1
    assert js["rate_mb_per_s"] is None


def test_keep_alive_serves_many_requests_on_one_connection(server, data):
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    for _ in range(3):
        conn.request("GET", f"/{NAME}")
        r = conn.getresponse()
        assert r.status == 200 and r.read() == data
    conn.close()


def test_token_required_when_set(remote_dir):
    with ShardServer(remote_dir, token="s3cret") as srv:
        assert requests.get(f"{srv.hub_url}/{NAME}").status_code == 401
        assert requests.get(f"{srv.hub_url}/{NAME}", headers={"Authorization": "Bearer s3cret"}).status_code == 200


# --- faults, each seen from a plain client

def test_fault_reset(server, data):
    server.add_fault(Fault("reset", file=NAME, at=0.5))
    status, hdrs, body, ending = raw_get(server, f"/{NAME}")
    assert status == 200 and hdrs["content-length"] == str(len(data))
    assert ending == "reset" and len(body) <= len(data) // 2
    assert server.stats(NAME).bytes_sent == len(data) // 2
    assert server.stats(NAME).faults == 1
    assert requests.get(f"{server.url}/{NAME}").content == data          # times=1: spent


@pytest.mark.parametrize("code", [500, 502, 503])
def test_fault_status(server, code):
    server.add_fault(Fault("status", status=code))
    assert requests.head(f"{server.url}/{NAME}").status_code == code     # status faults hit HEAD too
    assert requests.get(f"{server.url}/{NAME}").status_code == 200


def test_fault_429_has_retry_after(server):
    server.add_fault(Fault("429", retry_after=2, times=2))
    for _ in range(2):
        r = requests.get(f"{server.url}/{NAME}")
        assert r.status_code == 429 and r.headers["Retry-After"] == "2"
    assert requests.get(f"{server.url}/{NAME}").status_code == 200


def test_fault_stall(server, data):
    server.add_fault(Fault("stall", at=0.25, seconds=1.0))
    status, _, body, ending = raw_get(server, f"/{NAME}", timeout=0.4)
    assert status == 200 and ending == "timeout" and len(body) == int(len(data) * 0.25)
    # a patient client sees the connection close after the stall, body still short
    server.add_fault(Fault("stall", at=0.25, seconds=0.5))
    t0 = time.monotonic()
    status, _, body, ending = raw_get(server, f"/{NAME}", timeout=5)
    assert ending == "eof" and len(body) == int(len(data) * 0.25) and time.monotonic() - t0 >= 0.45


def test_fault_truncate(server, data):
    server.add_fault(Fault("truncate", at=0.3))
    status, hdrs, body, ending = raw_get(server, f"/{NAME}")
    assert status == 200 and hdrs["content-length"] == str(len(data))
    assert ending == "eof" and body == data[:int(len(data) * 0.3)]


def test_fault_flip(server, data):
    server.add_fault(Fault("flip", at=0.5))
    r = requests.get(f"{server.url}/{NAME}")
    assert r.status_code == 200 and len(r.content) == len(data)
    diff = [i for i, (a, b) in enumerate(zip(r.content, data)) if a != b]
    assert diff == [len(data) // 2]


def test_fault_404(server):
    server.add_fault(Fault("404", file="shard_0000[1-2].parquet", times=None))
    assert requests.get(f"{server.url}/{NAME}").status_code == 404
    assert requests.head(f"{server.hub_url}/shard_00002.parquet").status_code == 404
    assert requests.get(f"{server.url}/shard_00000.parquet").status_code == 200
    assert requests.get(f"{server.url}/{NAME}").status_code == 404                # forever
    server.clear_faults()
    assert requests.get(f"{server.url}/{NAME}").status_code == 200


def test_fault_wrong_length(server, data):
    server.add_fault(Fault("wrong_length"))
    status, hdrs, body, ending = raw_get(server, f"/{NAME}")
    assert int(hdrs["content-length"]) > len(data)
    assert ending == "eof" and body == data


def test_body_faults_skip_head_and_apply_to_ranges(server, data):
    server.add_fault(Fault("truncate", at=0.5))
    assert requests.head(f"{server.url}/{NAME}").status_code == 200               # not spent on HEAD
    status, hdrs, body, _ = raw_get(server, f"/{NAME}", headers={"Range": "bytes=1000-"})
    assert status == 206 and body == data[1000:1000 + (len(data) - 1000) // 2]
    assert server.stats(NAME).ranges[-1] == (1000, 1000 + (len(data) - 1000) // 2)


def test_fault_spec_strings():
    faults = parse_faults("reset:file=shard_00001.parquet:at=0.5:times=2; status:status=502:times=inf;"
                          "429:retry_after=3;stall:seconds=2.5:method=head")
    assert faults == [Fault("reset", file="shard_00001.parquet", at=0.5, times=2),
                      Fault("status", status=502, times=None), Fault("429", retry_after=3.0),
                      Fault("stall", seconds=2.5, method="HEAD")]
    for bad, what in [("explode", "unknown fault kind"), ("reset:at", "key=value"),
                      ("reset:colour=red", "key=value"), ("reset:at=half", "at='half'"),
                      ("reset:at=1.5", "fraction"), ("reset:times=0", "times")]:
        with pytest.raises(ConfigError, match=re.escape(what)):
            parse_faults(bad)


def test_faults_given_to_the_constructor(remote_dir):
    with ShardServer(remote_dir, faults="status:status=500:file=shard_00002.parquet") as srv:
        assert requests.get(f"{srv.url}/shard_00002.parquet").status_code == 500
        assert requests.get(f"{srv.url}/shard_00002.parquet").status_code == 200


# --- outage and rate

def test_outage(server, data):
    session = requests.Session()
    assert session.get(f"{server.url}/{NAME}").status_code == 200                # a kept-alive connection
    server.outage(0.6)
    with pytest.raises(requests.ConnectionError):
        session.get(f"{server.url}/{NAME}")
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{server.url}/{NAME}")
    assert any(r.status is None for r in server.requests)
    time.sleep(0.7)
    assert requests.get(f"{server.url}/{NAME}").content == data


def test_rate_cap_is_respected_and_shared(server, data):
    rate = 2.0                                                                     # MB/s
    server.set_rate(rate)
    t0 = time.monotonic()
    assert requests.get(f"{server.url}/{NAME}").content == data
    assert time.monotonic() - t0 >= len(data) / (2 * rate * 1e6)                  # not faster than 2x cap
    # two connections at once share the one cap
    results = []
    threads = [threading.Thread(target=lambda n=n: results.append(
        requests.get(f"{server.url}/shard_0000{n}.parquet").content)) for n in (2, 3)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = sum(map(len, results))
    assert len(results) == 2 and time.monotonic() - t0 >= total / (2 * rate * 1e6)
    server.set_rate(None)
    assert server.rate is None and requests.get(f"{server.url}/{NAME}").content == data
    with pytest.raises(ConfigError):
        server.set_rate(0)


def _timed_gets(srv, names, headers=None):
    """GET each name on its own connection, all at once; (seconds, bodies in order)."""
    out = [None] * len(names)

    def get(k):
        out[k] = requests.get(f"{srv.url}/{names[k]}", headers=headers).content
    threads = [threading.Thread(target=get, args=(k,)) for k in range(len(names))]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.monotonic() - t0, out


def test_per_connection_cap_limits_each_connection_not_the_link(remote_dir, data):
    per = 1.0                                                                      # MB/s per connection
    with ShardServer(remote_dir, per_connection_rate=per) as srv:
        assert srv.per_connection_rate == per * 1e6 and srv.rate is None
        took, bodies = _timed_gets(srv, [NAME])
        assert bodies == [data]
        assert took >= len(data) / (1.5 * per * 1e6)                             # one connection is capped
        # four connections at once each get the per-connection rate: the four take about as long as one
        # (a shared cap would take 4x): they are well under 2.5x one connection's time
        names = [f"shard_0000{n}.parquet" for n in (0, 2, 3, 4)]
        took4, bodies = _timed_gets(srv, names)
        assert [len(b) for b in bodies] == [(remote_dir / n).stat().st_size for n in names]
        assert took4 < 2.5 * max(took, len(data) / (per * 1e6))
        # with a shared cap too, the shared one binds for the four together
        srv.set_rate(2 * per)
        took4, _ = _timed_gets(srv, names)
        total = sum((remote_dir / n).stat().st_size for n in names)
        assert took4 >= total / (1.5 * 2 * per * 1e6)
        # a Range request is capped the same way, and lifting the cap restores full speed
        srv.set_rate(None)
        srv.set_per_connection_rate(None)
        took, bodies = _timed_gets(srv, [NAME])
        assert bodies == [data] and took < len(data) / (per * 1e6)
        assert srv.stats_json()["per_connection_mb_per_s"] is None
        with pytest.raises(ConfigError):
            srv.set_per_connection_rate(0)
    with pytest.raises(ConfigError):
        ShardServer(remote_dir, per_connection_rate=-1)


def test_bad_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not a directory"):
        ShardServer(tmp_path / "nope")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_serve_cli(remote_dir, data, sig):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "shardstream", "serve", str(remote_dir), "--port", "0",
                             "--rate", "100", "--per-connection-mb-per-s", "50",
                             "--faults", "404:file=shard_00000.parquet"],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        urls = {}
        deadline = time.monotonic() + 20
        while len(urls) < 2 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if m := re.search(r"(plain|hub):\s+(\S+)/<file>", line):
                urls[m.group(1)] = m.group(2)
        assert urls["hub"].startswith(urls["plain"]) and urls["plain"].startswith("http://127.0.0.1:")
        assert requests.get(f"{urls['hub']}/{NAME}").content == data
        assert requests.get(f"{urls['plain']}/shard_00000.parquet").status_code == 404
        stats = json.loads(requests.get(f"{urls['plain']}/_stats").text)
        assert stats["rate_mb_per_s"] == 100 and stats["files"][NAME]["bytes_sent"] == len(data)
        assert stats["per_connection_mb_per_s"] == 50
    finally:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:      # show where it hangs: faulthandler dumps every thread on SIGABRT
            proc.send_signal(signal.SIGABRT)
            _, err = proc.communicate(timeout=30)
            raise AssertionError(f"serve did not stop within 30 s of {sig.name}; its threads:\n{err[-6000:]}") from None
    assert proc.returncode == 0 and proc.stdout.read().strip().endswith("stopped")


def test_serve_cli_bad_input_is_a_clear_error(remote_dir, capsys):
    assert cli([str(remote_dir), "--port", "0", "--faults", "explode"]) == 2
    assert "unknown fault kind 'explode'" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# The tree API as the Hub answers it (huggingface_hub's list_repo_tree reads it; tests/test_hub.py uses it)

@pytest.fixture(scope="module")
def fineweb_tree(tmp_path_factory):
    from shardstream.sample import make_fineweb_sample
    d = tmp_path_factory.mktemp("fineweb-tree")
    make_fineweb_sample(d, chars_per_file=5_000)
    return d


def tree_pages(srv, url):
    """Every entry of a paged tree answer, following Link rel=next; (entries, the URLs asked)."""
    entries, asked = [], []
    while url:
        asked.append(url)
        r = requests.get(url, timeout=10)
        assert r.status_code == 200, r.text
        entries += r.json()
        url = r.links.get("next", {}).get("url")
    return entries, asked


def test_tree_recursive_lists_every_entry_under_the_path_in_pages(fineweb_tree):
    with ShardServer(fineweb_tree, hub_repo="o/fw") as srv:
        srv.tree_page_size = 4
        base = f"{srv.url}/api/datasets/o/fw/tree/main"
        entries, asked = tree_pages(srv, base + "?recursive=true&expand=false")
        paths = [e["path"] for e in entries]
        assert paths == sorted(paths) and len(paths) == len(set(paths)) == 13
        assert {e["path"] for e in entries if e["type"] == "directory"} == {
            "data", "data/CC-MAIN-2024-10", "data/CC-MAIN-2024-18", "sample", "sample/10BT"}
        assert len(asked) == 4 and all("recursive=true" in u and "expand=false" in u for u in asked)
        f = next(e for e in entries if e["path"] == "sample/10BT/000_00002.parquet")
        data = (fineweb_tree / f["path"]).read_bytes()
        assert f["size"] == len(data) and f["lfs"]["oid"] == hashlib.sha256(data).hexdigest()
        readme = next(e for e in entries if e["path"] == "README.md")
        assert "lfs" not in readme and "lastCommit" not in readme
        top, _ = tree_pages(srv, base)                                  # not recursive: the children
        assert [(e["path"], e["type"]) for e in top] == [("README.md", "file"), ("data", "directory"),
                                                         ("sample", "directory")]
        sub, _ = tree_pages(srv, base + "/sample%2F10BT?expand=true")  # huggingface_hub quotes the '/'
        assert [e["path"] for e in sub] == [f"sample/10BT/000_0000{i}.parquet" for i in range(4)]
        assert all(e["lastCommit"]["id"] == srv.revision for e in sub)


def test_tree_errors_carry_the_hubs_error_codes(fineweb_tree):
    with ShardServer(fineweb_tree, hub_repo="o/fw", token="t0k") as srv:
        api = f"{srv.url}/api/datasets/o/fw"
        auth = {"Authorization": "Bearer t0k"}
        cases = [(f"{api}/tree/main", {}, 401, "GatedRepo"),
                 (f"{srv.url}/api/datasets/o/other/tree/main", auth, 404, "RepoNotFound"),
                 (f"{api}/tree/v9", auth, 404, "RevisionNotFound"),
                 (f"{api}/tree/main/nope", auth, 404, "EntryNotFound")]
        for url, headers, status, code in cases:
            r = requests.get(url, headers=headers, timeout=10)
            assert (r.status_code, r.headers.get("X-Error-Code")) == (status, code), url
        r = requests.get(f"{api}/revision/main", headers=auth, timeout=10)
        assert r.json()["sha"] == srv.revision
        assert requests.get(api, headers=auth, timeout=10).json()["sha"] == srv.revision


def test_api_faults_hit_only_with_an_api_glob(fineweb_tree):
    with ShardServer(fineweb_tree, hub_repo="o/fw") as srv:
        srv.add_fault(Fault("429", retry_after=2, times=1))             # "*": files only, as before
        assert requests.get(f"{srv.url}/api/datasets/o/fw/tree/main", timeout=10).status_code == 200
        srv.clear_faults()
        srv.add_fault(Fault("429", file="api/*/tree/*", retry_after=2, times=1))
        r = requests.get(f"{srv.url}/api/datasets/o/fw/tree/main", timeout=10)
        assert r.status_code == 429 and r.headers["Retry-After"] == "2" and 't=2' in r.headers["RateLimit"]
        assert requests.get(f"{srv.url}/api/datasets/o/fw/tree/main", timeout=10).status_code == 200
