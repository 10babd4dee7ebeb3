"""The `shardstream` command: a thin dispatcher. Each subcommand lives beside the code it drives,
as a `cli(argv) -> exit code` function, so this file only maps names to them."""
import importlib
import logging
import sys

from .errors import ConfigError, ShardStreamError

COMMANDS = {
    "download": ("shardstream.download", "fetch train shards 0..N-1 and the val shard (nanochat's dataset -n N -w W)"),
    "ls": ("shardstream.listing", "list a source's shards, sizes and total (hf://, s3://, gs://, a local dir)"),
    "serve": ("shardstream.server", "serve a directory of shards like the HuggingFace Hub (Range, ETag, faults)"),
    "status": ("shardstream.status", "show a running downloader's status (--watch to follow)"),
    "make-sample": ("shardstream.sample", "write offline sample shards in nanochat's layout"),
    "demo": ("shardstream.demo", "offline end-to-end demo: sample shards, local server, streaming training"),
    "bench": ("shardstream.bench", "run the benchmarks in bench/ and print their ratios"),
    "plan": ("shardstream.plan", "simulate a streaming run with the downloader's own scheduler: first step, "
                                 "data wait, peak disk, wire bytes per node"),
}


def usage():
    lines = ["usage: shardstream COMMAND [options]   (shardstream COMMAND --help for details)", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"shardstream: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx2").setLevel(logging.WARNING)      # a line per Hub API request (huggingface_hub)
    from .settings import warn_unknown
    warn_unknown()                      # a typo in a SHARDSTREAM_* name would otherwise be ignored silently
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return module.cli(rest) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except ConfigError as e:
        print(f"shardstream {name}: {e}", file=sys.stderr)
        return 2
    except ShardStreamError as e:
        print(f"shardstream {name}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
