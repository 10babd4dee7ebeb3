"""What shardstream assumes of third-party libraries beyond their plain public API, pinned on the installed
versions, so an upgrade that breaks an assumption fails here, loudly, rather than making the package slower
or wrong without a word.

tiktoken / rustbpe (shardstream/tokenizer.py): the Encoding's constructor arguments and its pickle state,
encode_to_numpy matching encode_ordinary (the loader's numpy path), the identity hash old resume states
record, rustbpe's training API and determinism.

requests / urllib3 (shardstream/httptransport.py): the public urllib3 calls the transport reads bodies
with: HTTPResponse.read1 (>= 2.2: what has arrived, bytes as sent, chunks de-framed), .length_remaining,
.read(1) for the cap probe, and .shutdown (>= 2.3: ends a read blocked in a stall).
"""
import gzip
import hashlib
import http.client
import http.server
import inspect
import io
import pickle
import threading
import time

import numpy as np
import pytest

tiktoken = pytest.importorskip("tiktoken")
rustbpe = pytest.importorskip("rustbpe")
requests = pytest.importorskip("requests")
urllib3 = pytest.importorskip("urllib3")

from shardstream.tokenizer import (ENCODING_ARGS, SPECIAL_TOKENS, SPLIT_PATTERN, TOKENIZER_FILE,  # noqa: E402
                                   Tokenizer, _Unpickler, array_encoder, encoding_parts, train_tokenizer)

TEXTS = [
    "The old man walked slowly to the harbor, where the boats waited in the morning light.",
    "In 1987 she wrote 42 letters; only 3 arrived.\n\nThe rest were lost.",
    "Don't you think it's strange? We'll see what they've done.",
    "   leading spaces, tabs\tand trailing spaces   ",
    "Unicode: café, naïve, Straße, 日本語, emoji 🙂🚀.",
] * 40
# texts whose ids the numpy path must give exactly as encode_ordinary does
AWKWARD = ["", "x", "<|bos|>", "a <|bos|> b<|user_start|>c", "<|bos", "日本語 🙂", "\r\n\t  ", "1234567890"]
SURROGATE = "lone \ud800 surrogate"


def tiny_tokenizer():
    ranks = {bytes([i]): i for i in range(256)}
    for j, m in enumerate([b"th", b"he", b"the", b" the", b"in", b"ing"]):
        ranks[m] = 256 + j
    return Tokenizer.from_ranks(SPLIT_PATTERN, ranks)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, vocab_size=400)


# -----------------------------------------------------------------------------
# tiktoken

def test_encoding_constructor_takes_the_arguments_a_tokenizer_keeps():
    params = inspect.signature(tiktoken.Encoding.__init__).parameters
    assert set(ENCODING_ARGS) <= set(params), f"tiktoken {tiktoken.__version__}: Encoding({list(params)})"
    for name in ENCODING_ARGS[1:]:
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY


def test_a_pickled_encoding_is_its_constructor_arguments(tok, tmp_path):
    # nanochat's tokenizer.pkl is a pickled Encoding: Tokenizer.load reads it back as these arguments
    parts = encoding_parts(tok.enc)
    assert set(parts) == set(ENCODING_ARGS)
    assert parts["pat_str"] == SPLIT_PATTERN
    assert parts["special_tokens"] == {s: tok.encode_special(s) for s in SPECIAL_TOKENS}
    assert sorted(parts["mergeable_ranks"].values()) == list(range(len(parts["mergeable_ranks"])))
    assert all(tok.enc.decode_single_token_bytes(r) == b for b, r in parts["mergeable_ranks"].items())
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        data = pickle.dumps(tok.enc, protocol=protocol)
        assert _Unpickler(io.BytesIO(data)).load().state == parts, f"protocol {protocol}"
        (tmp_path / TOKENIZER_FILE).write_bytes(data)
        loaded = Tokenizer.load(tmp_path)
        assert loaded.identity() == tok.identity() and loaded.encode(TEXTS[:5]) == tok.encode(TEXTS[:5])


def test_identity_is_the_hash_old_resume_states_recorded(tok):
    # computed by the tokenizer that read tiktoken's private fields: a change here breaks old resumes
    t = tiny_tokenizer()
    assert t.identity() == "bpe-a027343ada87ec1f"
    assert t.encode("the thing in there <|bos|>") == [258, 32, 256, 261, 32, 260, 259, 114, 101, 32,
                                                       60, 124, 98, 111, 115, 124, 62]
    assert Tokenizer(t.enc).identity() == t.identity()           # parts read back from the Encoding
    assert pickle.loads(pickle.dumps(t)).identity() == t.identity()


def test_encode_to_numpy_gives_encode_ordinarys_ids(tok):
    # the loader's numpy path: tiktoken's public encode_to_numpy, which must treat special-token text as
    # ordinary text (tiktoken 0.9 and 0.10 did not) and return uint32 ids
    enc = tok.enc
    for text in AWKWARD + TEXTS[:5]:
        ids = enc.encode_to_numpy(text, disallowed_special=())
        assert ids.dtype == np.uint32 and ids.ndim == 1
        assert ids.tolist() == enc.encode_ordinary(text), text
    fn, numpy_path = array_encoder(enc)
    assert numpy_path, (f"tiktoken {tiktoken.__version__}: encode_to_numpy no longer gives encode_ordinary's "
                        f"ids, so encode_arrays fell back to copying lists (slower)")
    assert not fn(TEXTS[0]).flags.writeable                     # a view of tiktoken's buffer, not a copy


def test_lone_surrogates_take_the_list_way_with_the_same_ids(tok):
    # encode_to_numpy raises on them today; encode_ordinary repairs them: encode_arrays must match encode
    with pytest.raises(UnicodeEncodeError):
        tok.enc.encode_to_numpy(SURROGATE, disallowed_special=())
    assert [a.tolist() for a in tok.encode_arrays([SURROGATE, "ok"], num_threads=2)] == \
        tok.encode([SURROGATE, "ok"], num_threads=2)


class _NoNumpy:
    """An Encoding from before tiktoken 0.9: no encode_to_numpy."""

    def __init__(self, enc):
        self.encode_ordinary = enc.encode_ordinary
        self.special_tokens_set = enc.special_tokens_set


class _SpecialsAsSpecials(_NoNumpy):
    """tiktoken 0.9 and 0.10: encode_to_numpy encoded special-token text as the special token."""

    def __init__(self, enc):
        super().__init__(enc)
        self.encode_to_numpy = lambda text, **kw: np.array(enc.encode(text, allowed_special="all"), np.uint32)


@pytest.mark.parametrize("fake", [_NoNumpy, _SpecialsAsSpecials])
def test_the_list_fallback_gives_identical_ids(tok, fake, caplog):
    fn, numpy_path = array_encoder(fake(tok.enc))
    assert not numpy_path
    for text in AWKWARD + [SURROGATE] + TEXTS[:5]:
        ids = fn(text)
        assert ids.dtype == np.uint32 and ids.tolist() == tok.enc.encode_ordinary(text)
    t = Tokenizer(tok.enc, parts=encoding_parts(tok.enc))
    t.enc = fake(tok.enc)
    with caplog.at_level("WARNING", logger="shardstream.tokenizer"):
        got = t.encode_arrays(AWKWARD, num_threads=2)
    assert [a.tolist() for a in got] == tok.encode(AWKWARD)
    assert "copies lists instead" in caplog.text


# -----------------------------------------------------------------------------
# rustbpe

def test_rustbpe_trains_through_its_public_api():
    t = rustbpe.Tokenizer()
    t.train_from_iterator(iter(TEXTS), 300, pattern=SPLIT_PATTERN)
    assert t.get_pattern() == SPLIT_PATTERN
    ranks = list(t.get_mergeable_ranks())
    assert sorted(r for _, r in ranks) == list(range(len(ranks))) and 256 < len(ranks) <= 300
    assert all(len(bytes(b)) == 1 for b, r in ranks if r < 256)


def test_rustbpe_training_is_stable_across_versions(tok):
    # the same text gives the same merges as the installed versions did (a retrained tokenizer keeps the
    # identity old resume states recorded); a new rustbpe that trains differently fails here
    assert tok.identity() == "bpe-35fa610ec0759e12", f"rustbpe {getattr(rustbpe, '__version__', '?')}"


# -----------------------------------------------------------------------------
# requests / urllib3: the public calls httptransport.py reads bodies with

BODY = hashlib.sha256(b"seed").digest() * (3 * 2 ** 20 // 32)     # 3 MiB
STALL_SENT = 1000


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path == "/body":
            self._send(BODY)
        elif self.path == "/gzip":
            self._send(gzip.compress(BODY[:10_000]), ("Content-Encoding", "gzip"))
        elif self.path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(0, len(BODY), 100_000):
                piece = BODY[i:i + 100_000]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        elif self.path == "/stall":                # headers and a little body, then nothing
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY[:STALL_SENT])
            self.wfile.flush()
            self.server.release.wait(30)
            self.close_connection = True

    def _send(self, body, *headers):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        for h in headers:
            self.send_header(*h)
        self.end_headers()
        self.wfile.write(body)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass        # clients here hang up mid-body on purpose


@pytest.fixture(scope="module")
def url():
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.release = threading.Event()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.release.set()
    srv.shutdown()
    srv.server_close()


def get(url, path):
    return requests.get(url + path, stream=True, timeout=(5, 20))


def read_all(read, mv, left=float("inf")):
    out = bytearray()
    while left > 0:
        n = read(mv[:int(min(len(mv), left))])
        if not n:
            break
        out += mv[:n]
        left -= n
    return bytes(out)


def test_read1_de_chunks_a_chunked_body(url):
    # _body_reader on a chunked body (no length): read1 gives the body's bytes, the chunk framing gone
    with get(url, "/chunked") as resp:
        assert resp.raw.length_remaining is None
        assert read_all(lambda b: _copy_into(b, resp.raw.read1(len(b), decode_content=False)),
                        memoryview(bytearray(1 << 20))) == BODY


def test_length_remaining_is_the_content_length(url):
    with get(url, "/body") as resp:
        assert resp.raw.length_remaining == len(BODY)


def test_cap_probe_reads_one_byte(url):
    # _more_body: resp.raw.read(1) after the cap says whether the body goes on
    with get(url, "/body") as resp:
        resp.raw.read(len(BODY) - 1, decode_content=False)
        assert resp.raw.read(1, decode_content=False) == BODY[-1:]
        assert resp.raw.read(1, decode_content=False) == b""


def test_read1_gives_the_bytes_as_sent(url):
    # shards are written as the server sent them: no content decoding
    with get(url, "/gzip") as resp:
        raw = read_all(lambda b: _copy_into(b, resp.raw.read1(len(b), decode_content=False)),
                       memoryview(bytearray(4096)))
        assert gzip.decompress(raw) == BODY[:10_000]


def _copy_into(b, data):
    b[:len(data)] = data
    return len(data)


def test_public_read1_reads_what_has_arrived(url):
    # the public replacement for the fast path (urllib3 >= 2.2): at most n bytes, without waiting for n
    with get(url, "/stall") as resp:
        t0 = time.monotonic()
        assert resp.raw.read1(1 << 20, decode_content=False) == BODY[:STALL_SENT]
        assert time.monotonic() - t0 < 5
    with get(url, "/body") as resp:
        assert read_all(lambda b: _copy_into(b, resp.raw.read1(len(b), decode_content=False)),
                        memoryview(bytearray(1 << 20))) == BODY


def _blocked_read_returns_after(resp, read, stop):
    """Start `read` in a thread (the body stalls), call stop(resp); seconds until the read returned."""
    done = threading.Event()
    result = {}

    def reader():
        try:
            result["n"] = read()
        except Exception as e:      # noqa: BLE001 - a shut-down socket may raise instead of returning 0
            result["error"] = e
        done.set()

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    assert not done.wait(0.3), f"the stalled read returned at once: {result}"
    t0 = time.monotonic()
    stop(resp)
    assert done.wait(5), "a read blocked in a stall did not return after the socket was shut down"
    return time.monotonic() - t0


def test_public_shutdown_ends_a_stalled_read(url):
    # the public replacement (urllib3 >= 2.3): HTTPResponse.shutdown() (SHUT_RD on the same socket)
    with get(url, "/stall") as resp:
        assert resp.raw.read1(STALL_SENT, decode_content=False) == BODY[:STALL_SENT]
        _blocked_read_returns_after(resp, lambda: resp.raw.read1(1 << 20, decode_content=False),
                                    lambda r: r.raw.shutdown())
    # once the connection is released shutdown() raises: the watchdog must ignore that
    resp = get(url, "/body")
    resp.close()
    with pytest.raises((RuntimeError, ValueError)):
        resp.raw.shutdown()
