"""`python -m minigrok.cli`, the same as the `minigrok` console script."""

import sys

from . import main

sys.exit(main())
