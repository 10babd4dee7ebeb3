"""The Hub serves big files through a CDN redirect whose signed URL expires: every try of a transfer starts
again at the resolve URL, so a resume after the signed URL expired gets a fresh one and continues with a
Range (never a retry of the dead URL, never a start from byte 0).

Two real servers on 127.0.0.1: a "Hub" answering the resolve URL with 302 to the "CDN" and a new signature
each time (X-Linked-Size / X-Linked-Etag on its answer, as the Hub sends), and a "CDN" that accepts only
the newest signature (older ones: 403, as an expired signed URL) and drops the first transfer mid-body.
"""
import hashlib
import http.server
import threading

import pytest

from rel_common import TinyServer, make_shards
from shardstream.fetch import FetchPolicy, fetch_shard
from shardstream.shards import shard_name
from shardstream.source import Source

POLICY = FetchPolicy(connect_timeout=2, stall_timeout=2, max_attempts=4, backoff_initial=0.01, backoff_max=0.05,
                     fsync=False)


class Signed:
    """The shared state of the two servers: the newest signature, what the CDN saw."""

    def __init__(self, body):
        self.body, self.sha = body, hashlib.sha256(body).hexdigest()
        self.sig = 0
        self.lock = threading.Lock()
        self.cdn_gets = []              # (sig asked, Range header, status) per CDN GET
        self.drop_first = len(body) // 3

    def sign(self):
        with self.lock:
            self.sig += 1
            return self.sig


def hub_handler(state, cdn):
    class Hub(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def _redirect(self):
            if not self.path.endswith(shard_name(0)):
                self.send_error(404)
                return
            self.send_response(302)
            self.send_header("Location", f"{cdn.url}/blob?sig={state.sign()}")
            self.send_header("X-Linked-Size", str(len(state.body)))
            self.send_header("X-Linked-Etag", f'"{state.sha}"')
            self.send_header("ETag", f'"{state.sha}"')
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_HEAD = do_GET = _redirect
    return Hub


def cdn_handler(state):
    class Cdn(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_GET(self):
            sig = int(self.path.partition("sig=")[2] or 0)
            rng = self.headers.get("Range")
            if sig != state.sig:                        # an older signature: expired
                state.cdn_gets.append((sig, rng, 403))
                self.send_response(403)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start = int(rng.split("=")[1].split("-")[0]) if rng else 0
            body = state.body[start:]
            state.cdn_gets.append((sig, rng, 206 if rng else 200))
            self.send_response(206 if rng else 200)
            if rng:
                self.send_header("Content-Range", f"bytes {start}-{len(state.body) - 1}/{len(state.body)}")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("ETag", f'"{state.sha}"')
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if state.drop_first is not None:
                n, state.drop_first = state.drop_first, None
                self.wfile.write(body[:n])
                self.wfile.flush()
                state.sign()                            # the signed URL expires while the transfer is down
                self.close_connection = True
                return
            self.wfile.write(body)
    return Cdn


@pytest.fixture
def body(tmp_path_factory):
    d = tmp_path_factory.mktemp("cdn-remote")
    make_shards(d, 2, seed=5)
    return (d / shard_name(0)).read_bytes()


def test_an_expired_cdn_url_is_resolved_again_and_the_transfer_resumes(body, tmp_path):
    state = Signed(body)
    with TinyServer(cdn_handler(state)) as cdn, TinyServer(hub_handler(state, cdn)) as hub:
        r = fetch_shard(Source(hub.url, 2), 0, tmp_path, POLICY)
    assert (tmp_path / shard_name(0)).read_bytes() == body and r.sha256 == state.sha
    ok = [(sig, rng) for sig, rng, status in state.cdn_gets if status != 403]
    assert len(ok) >= 2
    first, resumed = ok[0], ok[-1]
    assert first[1] is None and resumed[1] is not None and resumed[1].startswith(f"bytes={len(body) // 3}-")
    assert resumed[0] > first[0]                        # a fresh signature from the resolve URL
    assert all(status != 403 for _, _, status in state.cdn_gets)    # the dead URL was never asked again
