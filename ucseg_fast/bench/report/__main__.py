"""The child side of `run_isolated`: ``python -m ucseg_fast.bench.report --worker ...``."""
import sys

from .isolation import worker_main

sys.exit(worker_main(sys.argv[1:]))
