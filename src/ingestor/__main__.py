"""``python -m ingestor``: the console script."""

import sys

from ingestor.cli import main

sys.exit(main())
