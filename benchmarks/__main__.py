"""``python -m benchmarks run|report``: see benchmarks/harness.py and benchmarks/README.md."""

import sys

from benchmarks.harness import main

sys.exit(main())
