"""`python -m scripts.base_train`: the reference trainer (see shardstream/train.py for the flags)."""
from shardstream.train import main

if __name__ == "__main__":
    raise SystemExit(main())
