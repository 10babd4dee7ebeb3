"""How one shard's bytes are split between concurrent Range requests: pure functions over spans (no I/O,
no clock), used by fetch.py's transfer loop.

A span is (start, stop), stop exclusive. `plan_parts` cuts what is still missing into up to `connections`
parts of at least `min_part` bytes; `steal_point` lets a free connection take the tail of a busy part;
`auto_parts` decides, from measured rates, whether one more connection helps (max_connections="auto");
`judged_parts` is what that judgement found, and `remembered_parts` lets the next shards from the same
origin start with it (one connection: no split at all) instead of judging again, for AUTO_MEMORY seconds.
"""
from dataclasses import dataclass

AUTO_MAX_CONNECTIONS = 4    # max_connections="auto" adds parts up to this many...
AUTO_GAIN = 1.15            # ...while the last part added raised the shard's rate by this factor (4 vs 3: 1.33)
AUTO_LINEAR = 0.85          # ...doubling the parts when the rate grew at least this share of in proportion
AUTO_WINDOW = 0.4           # seconds of a part count's bytes before it is judged
AUTO_MEMORY = 60.0          # seconds a judged part count holds for the next shards from the same origin

PART_ALIGN = 64 << 10       # split points fall on this grid (page- and extent-friendly writes)


def merge_spans(spans):
    """Sorted, non-overlapping (start, stop) spans covering the same bytes as `spans` (empty ones gone)."""
    out = []
    for a, b in sorted((a, b) for a, b in spans if b > a):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def missing_spans(size, done):
    """The spans of [0, size) that `done` does not cover, in order."""
    out, at = [], 0
    for a, b in merge_spans(done):
        a, b = max(a, 0), min(b, size)
        if a > at:
            out.append((at, a))
        at = max(at, b)
    if at < size:
        out.append((at, size))
    return out


def split_point(start, stop, min_part, align=PART_ALIGN):
    """Where to cut [start, stop) into two parts of at least min_part each (near the middle, on the align
    grid when the grid has a point that keeps both halves >= min_part), or None when it is too small."""
    if stop - start < 2 * min_part:
        return None
    mid = start + (stop - start) // 2
    snapped = mid - mid % align
    return snapped if snapped - start >= min_part and stop - snapped >= min_part else mid


def plan_parts(size, done_spans, connections, min_part):
    """The spans still to fetch of a `size`-byte file whose `done_spans` are on disk: the gaps, the
    largest cut in two while there are fewer than `connections` spans and a cut leaves both halves
    >= min_part. More gaps than connections stay as they are (fetched as connections come free)."""
    spans = missing_spans(size, done_spans)
    while len(spans) < connections:
        i = max(range(len(spans)), key=lambda k: spans[k][1] - spans[k][0], default=None)
        cut = None if i is None else split_point(*spans[i], min_part)
        if cut is None:
            break
        a, b = spans[i]
        spans[i:i + 1] = [(a, cut), (cut, b)]
    return spans


def steal_point(pos, end, in_flight, min_part):
    """Where a free connection may take over the tail of a part receiving [pos, end) (a read of up to
    in_flight bytes may be landing at pos): a cut leaving both sides >= min_part, or None."""
    return split_point(pos + in_flight, end, min_part)


def auto_parts(rate_before, parts_before, rate_now, parts, max_parts, gain=AUTO_GAIN):
    """max_connections="auto": how many parts to run next, from the shard's measured rate with
    parts_before parts (rate_before None: nothing measured yet, as at the first judgement) and with the
    `parts` running now. The first judgement tries one more. A part count that raised the rate by `gain`
    says the connections, not the link, were the limit: one more part, or twice as many when the rate
    grew nearly in proportion (a per-connection cap: ramp fast). Otherwise stay (the caller stops
    judging). Never past max_parts."""
    if parts >= max_parts:
        return parts
    if rate_before is None:
        return parts + 1
    if rate_now < rate_before * gain:
        return parts
    linear = rate_now >= rate_before * parts / parts_before * AUTO_LINEAR
    return min(max_parts, parts * 2 if linear else parts + 1)


@dataclass(frozen=True)
class Verdict:
    """What "auto" found for an origin: `parts` connections per shard, judged at monotonic time `at`."""
    parts: int
    at: float


def judged_parts(rate_before, parts_before, rate_now, parts, gain=AUTO_GAIN):
    """Once auto_parts says stay: the part count the judgement found worth having, the last one that
    measurably raised the rate (parts_before when the part added last did not)."""
    if rate_before is None or rate_now >= rate_before * gain:
        return parts
    return parts_before


def remembered_parts(verdict, now, memory=AUTO_MEMORY):
    """The part count a new shard from an origin starts with, fixed, from that origin's Verdict (None:
    judge afresh, starting from one connection: no verdict, or one older than `memory` seconds, since
    links and caps change)."""
    if verdict is None or now - verdict.at >= memory:
        return None
    return verdict.parts
