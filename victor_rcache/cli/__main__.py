"""``python -m victor_rcache.cli``: the ``victor-rcache`` command."""

import sys

from . import main

sys.exit(main())
