"""The seam between fetch.py's transfer loop and the ways a shard's bytes come.

fetch.py owns everything a transfer shares whatever the source (the lock, partial files and sidecars,
retries and backoff, the running hash, the low-speed rule, verification, the commit). A transport owns
only how one source kind answers: httptransport.HttpTransport (http(s) and the Hub) and
objectstore.ObjectTransport (s3, gs, local folders through fsspec). fetch.py picks one by the source's kind and
makes one per fetch call:

    t = HttpTransport(source, shard_id, policy, session)
    info = t.probe()                        # RemoteInfo: size, sha256/md5, validators
    t.can_resume(info)                      # may bytes kept from an earlier try be continued?
    body = t.open(info, start)              # the bytes from `start` (body.start may be 0: the whole file)
    n = body.readinto(memoryview)           # 0 at the end; body.abort() from another thread unblocks it
    body.done()                             # all bytes in: a last check (an object store: same version?)
    body.close()

What a try can end in, raised by transports and handled by the loop:
- Retry(cause, retry_after=, progressed=, restart=, reprobe=): worth another try after a backoff.
  restart: the bytes kept are no good (a lying range, a 416): start the file over. reprobe: the file
  changed at the source: forget what it was said to be, ask again, start over.
  unreached: the host, when no connection to it has succeeded in this process (the loop gives up within
  seconds: a source that never answered is offline or misnamed, not flaky).
- Fatal(cause): retrying cannot fix it (404, 401/403, a refused redirect, a malformed listing).
A transport turns its library's network errors into Retry, so the loop never sees them.
"""
import re


class Retry(Exception):
    """This try failed in a way worth retrying."""

    def __init__(self, cause, retry_after=None, progressed=None, restart=False, reprobe=False, unreached=None):
        super().__init__(cause)
        self.cause, self.retry_after = cause, retry_after
        self.progressed = progressed        # None: the loop decides from the bytes this try wrote
        self.restart, self.reprobe = restart, reprobe
        self.unreached = unreached          # the host, when no connection to it ever succeeded here


class Fatal(Exception):
    """This try failed in a way retrying cannot fix."""


class Body:
    """The bytes one try receives: from `start` (what was asked, or 0 when the source sends the whole
    file), at most `length` of them (inf: unknown)."""
    start = 0
    length = float("inf")

    def readinto(self, mv):
        raise NotImplementedError

    def done(self):
        """Every byte asked for came: a last check before they are verified (may raise Retry)."""

    def more(self):
        """After `length` (or a cap) was read: does the source go on sending? (a body over the cap)"""
        return False

    def abort(self):
        """Unblock a read in progress (called from the stop watchdog's thread)."""

    def close(self):
        pass


def scrub(text, token=None):
    """Error text safe to show: no token, no query strings (signed CDN URLs carry secrets there)."""
    text = str(text)
    if token:
        text = text.replace(token, "<redacted>")
    return re.sub(r"(https?://[^\s'\"?]*)\?[^\s'\"]*", r"\1?<redacted>", text)


def describe(e, token=None):
    return scrub(f"{type(e).__name__}: {e}", token)

