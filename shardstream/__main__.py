"""`python -m shardstream` is the `shardstream` command."""
import sys

from .cli import main

sys.exit(main())
