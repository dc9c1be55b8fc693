"""``python -m ember launch ...`` is ``ember launch ...``."""

import sys

from ember.cli import main

sys.exit(main())
