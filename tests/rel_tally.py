"""Sum the tally the reliability tests write when REL_TALLY is set (see tests/rel_common.py).

    .venv/bin/python tests/rel_tally.py /tmp/tally.jsonl
prints cases run, faults injected, shards and bytes verified, and shards lost (must be 0).
"""
import json
import sys


def main(path):
    rows = [json.loads(line) for line in open(path) if line.strip()]
    cases = len(rows)
    faults = sum(r["faults"] for r in rows)
    shards = sum(r["shards_read"] for r in rows)
    verified = sum(r["bytes_verified"] for r in rows)
    lost = sum(r["lost"] for r in rows)
    by_file = {}
    for r in rows:
        by_file.setdefault(r["case"].split("/")[0], []).append(r)
    for name, rs in sorted(by_file.items()):
        print(f"{name:16s} cases {len(rs):3d}  faults {sum(r['faults'] for r in rs):6d}  "
              f"shards read {sum(r['shards_read'] for r in rs):6d}  bytes verified "
              f"{sum(r['bytes_verified'] for r in rs):>13,d}  lost {sum(r['lost'] for r in rs)}")
    print(f"{'total':16s} cases {cases:3d}  faults {faults:6d}  shards read {shards:6d}  "
          f"bytes verified {verified:>13,d}  lost {lost}")
    return 0 if lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
