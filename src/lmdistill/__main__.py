"""``python -m lmdistill`` (and ``accelerate launch -m lmdistill``)."""

import sys

from lmdistill.cli import main

sys.exit(main())
