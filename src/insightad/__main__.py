"""``python -m insightad`` is the ``insightad`` command."""

import sys

from insightad.cli import main

sys.exit(main())
