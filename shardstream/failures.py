"""Failure bookkeeping of the downloader, as pure functions over frozen records.

A shard's failed fetch calls are one `schedule.Failure` (attempts, rounds, permanent, retry_at, the last
error), replaced, never changed:

- `record(previous, error, policy, now, u)`: the Failure after one more failed call, and what the
  executor reports (`Recorded`: the backoff drawn, whether it gave up, the counts to add). `u` is the
  caller's uniform draw in [0, 1), so the backoff's full jitter is a value here, not a random call.
- `reader_outcome(snap, shard, waited, policy, ...)`: what a reader that has waited `waited` seconds
  for shard gets: None (keep waiting) or a `ReaderOutcome` (raise this error; or skip, with why).
  schedule.failure_verdict decides failing against skipping; this adds the checks before it (a shard
  already skipped, the disk floor, a budget that never makes room) and builds the errors.
- `failure_error(shard, failure, url, policy)`: the FetchError a "fail" policy raises.
- `why_not_ready(shard, ...)`: the words a waiting reader's timeout and warnings give.

No threads, no clock, no I/O: tests/test_downloader.py checks them on values.
"""
from dataclasses import dataclass
from enum import Enum

from . import schedule
from .errors import DiskSpaceError, FetchError, PermanentFetchError, ShardSkipped, TransientFetchError
from .schedule import Failure
from .shards import shard_name
from .status import human_bytes


@dataclass(frozen=True)
class Recorded:
    """What one more failed fetch call means for the executor."""
    failure: Failure
    gave_up: bool               # permanent (not retried; counted as a failure now)
    delay: float | None         # the backoff before the next try (None: gave up)
    retries: int                # to add to the run's retry count
    failures: int               # to add to the run's failure count


def record(previous, error, policy, now, u):
    """The Failure after a fetch call of a shard failed with `error` (FailurePolicy `policy`, the time
    `now`, a uniform draw `u` in [0, 1) for the backoff's jitter). A permanent error is given up on
    (never retried) unless the policy is "wait"; else the next try comes after a backoff drawn in
    [cap/2, cap] (schedule.backoff_cap)."""
    prev = previous or Failure()
    tried = max(1, getattr(error, "attempts", 0) or 1)
    permanent = isinstance(error, PermanentFetchError)
    f = Failure(attempts=prev.attempts + tried, rounds=prev.rounds + 1, permanent=permanent, error=error)
    if permanent and policy.mode != "wait":
        return Recorded(Failure(f.attempts, f.rounds, True, float("inf"), error), True, None, tried - 1, 1)
    cap = schedule.backoff_cap(policy, f)
    delay = cap / 2 + u * (cap - cap / 2)
    # the call's own retries (tried - 1), and this call's retry later
    return Recorded(Failure(f.attempts, f.rounds, permanent, now + delay, error), False, delay, tried, 0)


class Outcome(Enum):
    RAISE = "raise"             # raise `error` in the reader
    SKIP = "skip"               # record the shard as skipped (`reason`) and raise `error` (ShardSkipped)


@dataclass(frozen=True)
class ReaderOutcome:
    kind: Outcome
    error: BaseException
    reason: str | None = None   # SKIP: why, for the log and the event
    counts: bool = False        # SKIP: count it as a failure (a permanent one was counted when recorded)


def failure_error(shard, failure, url, policy):
    """The error a "fail" policy raises for a shard that `failure` describes (url: redacted), with the
    last cause as its __cause__; the class is the cause's own when it is a FetchError."""
    e = failure.error
    why = "permanent" if failure.permanent else f"still failing after the {policy.deadline:g} s deadline"
    msg = (f"{shard_name(shard)} could not be downloaded from {url} after {failure.attempts} attempts ({why}); "
           f"last cause: {type(e).__name__}: {e}")
    cls = type(e) if isinstance(e, FetchError) else (PermanentFetchError if failure.permanent else TransientFetchError)
    err = cls(msg, shard_id=shard, url=url, attempts=failure.attempts, cause=e)
    err.__cause__ = e
    return err


def reader_outcome(snap, shard, waited, policy, *, skipped, blocked, disk_error, url):
    """What a reader waiting `waited` seconds for shard gets (None: keep waiting). skipped: shard ->
    reason; blocked: shard -> why it waits for room; disk_error: the DiskSpaceError of paused downloads
    (or None); url: the shard's, redacted."""
    if shard in skipped:
        return ReaderOutcome(Outcome.RAISE, ShardSkipped(f"{shard_name(shard)} was skipped: {skipped[shard]}",
                                                         shard_id=shard))
    if disk_error is not None and shard not in snap.inflight:
        return ReaderOutcome(Outcome.RAISE, DiskSpaceError(str(disk_error)))
    if shard in blocked and not snap.inflight and waited >= policy.deadline:
        return ReaderOutcome(Outcome.RAISE, DiskSpaceError(f"{shard_name(shard)} cannot be downloaded: "
                                                           f"{blocked[shard]}"))
    verdict = schedule.failure_verdict(snap, shard, waited, policy)
    if verdict is None:             # "wait" keeps waiting: the reader's loop warns every warn_every s
        return None
    f = verdict.failure
    if verdict.in_flight:
        f = Failure(attempts=f.attempts, error=TransientFetchError(
            f"{shard_name(shard)} ({url}): {f.attempts} tries failed while its download was in flight, last: "
            f"{f.error}", shard_id=shard, url=url, attempts=f.attempts, cause=f.error))
    if verdict.mode == "fail":
        return ReaderOutcome(Outcome.RAISE, failure_error(shard, f, url, policy))
    reason = f"{type(f.error).__name__} after {f.attempts} attempts: {f.error}"
    return ReaderOutcome(Outcome.SKIP, ShardSkipped(f"{shard_name(shard)} was skipped: {reason}", shard_id=shard,
                                                    cause=f.error), reason, counts=not f.permanent)


def why_not_ready(shard, *, inflight, troubled, blocked, failures, disk_error):
    """Why shard is not on disk yet, in words. inflight: shard -> (reserved bytes, bytes so far);
    troubled: shard in flight -> (tries failed, last cause); blocked: shard -> why it waits for room;
    failures: shard -> Failure; disk_error: the error of paused downloads, or None."""
    if shard in inflight:
        r, got = inflight[shard]
        tries, cause = troubled.get(shard, (0, None))
        trouble = f"; {tries} tries failed, last: {cause}" if tries else ""
        return f"downloading, {human_bytes(got)} of {human_bytes(r)}{trouble}"
    if shard in blocked:
        return f"waiting for room: {blocked[shard]}"
    f = failures.get(shard)
    if f is not None and f.error is not None:
        return f"{f.attempts} failed attempts, last: {type(f.error).__name__}: {f.error}"
    if disk_error is not None:
        return str(disk_error)
    return "queued behind other downloads"
