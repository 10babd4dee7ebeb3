"""HTTP(S) and the Hub as a transport (transport.py): HEAD for what a shard is, GET with Range to resume.

    t = HttpTransport(source, 7, policy, session)       # one per fetch call; session: a requests.Session
    info = t.probe()                                    # size (X-Linked-Size, else Content-Length), sha256
                                                        # (X-Linked-Etag, else a SHA256SUMS at the base URL),
                                                        # ETag, Last-Modified
    body = t.open(info, start)                          # GET, Range: bytes=start- with If-Range
    body = t.open(info, start, end)                     # one part of a split fetch: bytes=start-(end-1)

Redirects are followed by hand (source.follow_problem: http(s) only, plain http only to loopback unless
allowed; source.headers_for: the token only to its exact origin). Without a sha256 to check at the end, a
resume is safe only where the server can say the bytes are the same file: the Range carries If-Range with
the strong ETag (else Last-Modified), and the answer's validators are checked again; a changed file is a
Retry(reprobe=True), a lying Content-Range or a 416 a Retry(restart=True), a 200 the whole file again.
A part of a split fetch (end given) always carries If-Range and has its validators checked, sha256 or
not: parts come from separate requests, and a changed file is caught at the first part that sees it.
"""
import http.client
import logging
import re
import time
from dataclasses import replace
from email.utils import parsedate_to_datetime

import requests
import urllib3

from .checksums import CHECKSUMS, MAX_CHECKSUM_FILE_BYTES, ChecksumFileError, ChecksumFileUnavailable
from .shards import shard_name
from .source import RemoteInfo, follow_target, redact_url, url_origin
from .transport import Body, Fatal, Retry, describe

logger = logging.getLogger(__name__)

MAX_REDIRECTS = 10
SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
# What a dropped, reset, stalled or garbled connection raises somewhere between requests and the socket.
NETWORK_ERRORS = (OSError, http.client.HTTPException, requests.RequestException, urllib3.exceptions.HTTPError)
_answered = set()           # origins that answered in this process: a failure there is a blip, not "offline"


def _network_retry(e, url, token, what=""):
    """A network error as a Retry; `unreached` names the server when it never answered in this process."""
    origin = url_origin(url)
    never = isinstance(e, requests.ConnectionError) and origin not in _answered
    return Retry(f"{what}{describe(e, token)}", unreached=redact_url(origin) if never and origin else None)


class HttpTransport:
    """One fetch call's HTTP side (see the module docstring)."""
    parts = True            # open(info, start, end) asks for one span: fetch.py may split a shard

    def __init__(self, source, shard_id, policy, session):
        self.source, self.shard_id, self.policy, self.session = source, shard_id, policy, session
        self.url = source.url(shard_id)

    def probe(self):
        """What the server says about the shard now (a HEAD; the checksum file when it gives no sha256)."""
        try:
            info = _head(self.source, self.url, self.policy, self.session)
        except NETWORK_ERRORS as e:
            raise _network_retry(e, self.url, self.source.token, "HEAD failed: ") from None
        if info.sha256 is None and self.policy.checksum_file:
            try:
                sums = CHECKSUMS.get(self.source.base_url,
                                     lambda: _load_checksum_file(self.source, self.policy, self.session))
            except ChecksumFileError as e:
                raise Fatal(f"{e}; or skip the check with FetchPolicy(checksum_file=None)") from None
            sha = sums.sha256(shard_name(self.shard_id)) if sums is not None else None
            if sha is not None:
                info = replace(info, sha256=sha, sha256_from=sums.url)
        return info

    def can_resume(self, info):
        """Kept bytes may be continued when the end checks them (sha256) or the server can (a validator)."""
        return info.sha256 is not None or _validator(info) is not None

    def open(self, info, start, end=None):
        # Nothing at the end would catch a splice without a sha256: the server must. A part (end given)
        # is checked whatever the end holds, so a changed file restarts the shard at once.
        guard = info.sha256 is None or end is not None
        headers = {}
        if start > 0 or end is not None:
            headers["Range"] = f"bytes={start}-" if end is None else f"bytes={start}-{end - 1}"
            if guard and _validator(info) is not None:
                headers["If-Range"] = _validator(info)
        resp = None
        try:
            first, resp = _request(self.session, self.source, "GET", self.url, self.policy, headers)
            if first is not resp:
                first.close()
            if resp.status_code == 416 and start > 0:
                raise Retry("HTTP 416 on resume: the server refused the range", restart=True)
            _check_status(resp)
            changed = _changed_validator(info, resp) if guard else None
            if changed is not None:
                raise Retry(changed, reprobe=True)
            got = 0
            if resp.status_code == 206:
                got, total = _content_range(resp.headers.get("Content-Range"))
                if got != start:
                    raise Retry(f"the server sent a range starting at {got}, not {start}", restart=True)
                if total is not None and info.size is not None and total != info.size:
                    raise Retry(f"the server now says {total} bytes, not {info.size}; starting over", reprobe=True)
            elif start > 0 and end is None:
                logger.info("shard %05d: the server sent the whole file (HTTP %d), not the range from byte %d; "
                            "restarting from byte 0", self.shard_id, resp.status_code, start)
            return HttpBody(resp, got, self.source.token)
        except NETWORK_ERRORS as e:
            if resp is not None:
                resp.close()
            raise _network_retry(e, self.url, self.source.token) from None
        except BaseException:
            if resp is not None:
                resp.close()
            raise


class HttpBody(Body):
    """A GET's body, read as it arrives (see _body_reader)."""

    def __init__(self, resp, start, token):
        self.resp, self.start, self.token = resp, start, token
        self._read, self.length = _body_reader(resp)

    def readinto(self, mv):
        try:
            return self._read(mv)
        except NETWORK_ERRORS as e:
            raise Retry(describe(e, self.token)) from None

    def more(self):
        return _more_body(self.resp)

    def abort(self):
        _shutdown(self.resp)

    def close(self):
        self.resp.close()


# -----------------------------------------------------------------------------
# requests with redirects followed by hand

def _redirect_target(source, url, location):
    """Where a redirect may go (source.follow_problem): http(s) only, well-formed, and plain http only to
    loopback unless allowed."""
    target, why = follow_target(url, location, source.allow_insecure)
    if why:
        raise Fatal(f"refused a redirect to {why}")
    return target


def _request(session, source, method, url, policy, headers=None, follow=True):
    """One request, following up to MAX_REDIRECTS redirects by hand when follow is set (so the bearer
    token is sent only to its host, and only http(s) targets are followed). Returns (first, last)
    responses; first is closed unless it is last."""
    first = None
    try:
        for _ in range(MAX_REDIRECTS + 1):
            h = {"Accept-Encoding": "identity", **(headers or {}), **source.headers_for(url)}
            try:
                resp = session.request(method, url, headers=h, allow_redirects=False, stream=True,
                                       timeout=(policy.connect_timeout, policy.stall_timeout))
            except ValueError as e:     # requests parses a Location even when it does not follow it
                if isinstance(e, requests.RequestException):
                    raise
                raise Fatal(f"refused a redirect to a malformed URL ({e})") from None
            _answered.add(url_origin(url))
            if first is None:
                first = resp
            if not (follow and resp.is_redirect and "Location" in resp.headers):
                return first, resp
            url = _redirect_target(source, url, resp.headers["Location"])
            if resp is not first:
                resp.close()
        raise Fatal(f"more than {MAX_REDIRECTS} redirects")
    except BaseException:
        if first is not None:
            first.close()
        raise


def _retry_after(resp):
    value = resp.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _check_status(resp):
    """Raise _Fatal / _Retry for an error status; return for 2xx."""
    code = resp.status_code
    if 200 <= code < 300:
        return
    what = f"HTTP {code} {resp.reason or ''}".strip()
    if code in (404, 410):
        raise Fatal(f"{what}: the shard does not exist at this source")
    if code in (401, 403):
        raise Fatal(f"{what}: not authorized (for a gated repo set HF_TOKEN to a token that has access)")
    if code == 429 or code == 408 or code >= 500:
        raise Retry(what, retry_after=_retry_after(resp))
    if 300 <= code < 400:
        raise Fatal(f"{what}: redirect without a usable Location")
    raise Fatal(what)



def _validator(info):
    """What an If-Range may carry for info: its strong ETag, else its Last-Modified, else None."""
    if info.etag and not info.etag.startswith("W/"):
        return info.etag
    return info.last_modified or None


def _changed_validator(info, resp):
    """Why resp is not a piece of the file info describes (its ETag or Last-Modified differs), or None."""
    for what, ours in (("ETag", info.etag), ("Last-Modified", info.last_modified)):
        theirs = resp.headers.get(what)
        if ours and theirs and theirs != ours:
            return f"the server's {what} is now {theirs}, not {ours}: the file changed"
    return None


def _parse_sha256(value):
    if not value:
        return None
    value = value.strip()
    if value.startswith("W/"):
        value = value[2:]
    value = value.strip('"')
    return value.lower() if SHA256_RE.match(value) else None


def _head(source, url, policy, session):
    """HEAD without following the first redirect (the Hub puts X-Linked-* on it); follow on only when
    the size is not there yet."""
    first, last = None, None
    try:
        first, _ = _request(session, source, "HEAD", url, policy, follow=False)
        last = first
        if first.is_redirect and "X-Linked-Size" not in first.headers and "Location" in first.headers:
            _, last = _request(session, source, "HEAD",
                               _redirect_target(source, url, first.headers["Location"]), policy)
        if not (first.is_redirect and "X-Linked-Size" in first.headers):    # that one is the Hub's answer
            _check_status(last)
        size = first.headers.get("X-Linked-Size") or last.headers.get("X-Linked-Size") \
            or (last.headers.get("Content-Length") if last.status_code == 200 else None)
        try:
            size = int(size) if size is not None else None
        except ValueError:
            size = None
        if size is not None and size < 0:
            size = None
        sha = _parse_sha256(first.headers.get("X-Linked-Etag") or last.headers.get("X-Linked-Etag"))
        # The Hub's own answer carries the file's ETag; behind any other redirect, the file's server does.
        etag = (first if first is last or "X-Linked-Size" in first.headers else last).headers.get("ETag")
        return RemoteInfo(size=size, sha256=sha, etag=etag, last_modified=last.headers.get("Last-Modified"))
    finally:
        for r in {id(r): r for r in (first, last) if r is not None}.values():
            r.close()



def _load_checksum_file(source, policy, session):
    """(redacted url, text) of the checksum file at source's base URL, or None when it has none (a 4xx,
    or a reply too large to be one). 5xx, 429, a refused redirect or a dropped connection raise
    ChecksumFileUnavailable: the shard goes on without, and the file is asked for again later."""
    url = f"{source.base_url.rstrip('/')}/{policy.checksum_file}"
    try:
        return _read_checksum_file(source, url, policy, session)
    except Retry as e:
        cause = e.cause
    except Fatal as e:
        cause = str(e)
    except NETWORK_ERRORS as e:
        cause = describe(e, source.token)
    raise ChecksumFileUnavailable(f"cannot read {redact_url(url)} now ({cause})")


def _read_checksum_file(source, url, policy, session):
    first, last = _request(session, source, "GET", url, policy)
    try:
        code = last.status_code
        if 400 <= code < 500 and code not in (408, 429):
            logger.debug("no checksum file at %s (HTTP %d)", redact_url(url), code)
            return None
        _check_status(last)
        data = bytearray()
        for chunk in last.iter_content(1 << 16):
            data += chunk
            if len(data) > MAX_CHECKSUM_FILE_BYTES:     # what answers there is not a checksum file
                logger.warning("ignoring %s: over %d bytes, not a checksum file; shards are checked by size "
                               "and parquet footer only", redact_url(url), MAX_CHECKSUM_FILE_BYTES)
                return None
        logger.info("verifying shards against %s", redact_url(url))
        return redact_url(url), data.decode("utf-8", errors="replace")
    finally:
        for r in {id(r): r for r in (first, last)}.values():
            r.close()



def _shutdown(resp):
    """End a read blocked in a stall (urllib3's HTTPResponse.shutdown: SHUT_RD on the live socket)."""
    try:
        resp.raw.shutdown()
    except (RuntimeError, ValueError, OSError):    # released already, or no socket
        pass


def _body_reader(resp):
    """(readinto, bytes the body may still give): urllib3's read1, which returns what has arrived (the
    stall and low-speed rules need that), the bytes as sent (no content decoding)."""
    read1, length = resp.raw.read1, resp.raw.length_remaining

    def readinto(b):
        data = read1(len(b), decode_content=False)
        n = len(data)
        b[:n] = data
        return n

    return readinto, float("inf") if length is None else length


def _content_range(value):
    """'bytes 100-199/1000' -> (100, 1000); total None for '*'; (None, None) when unparseable."""
    m = re.match(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", value or "")
    if not m:
        return None, None
    return int(m.group(1)), (None if m.group(3) == "*" else int(m.group(3)))


def _more_body(resp):
    """After reading up to the cap: does the body go on?"""
    try:
        return bool(resp.raw.read(1, decode_content=False))
    except NETWORK_ERRORS:
        return False
