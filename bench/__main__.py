"""``python -m bench``: the peer benchmarks; see bench/run.py."""

import sys

from bench.run import main

sys.exit(main())
