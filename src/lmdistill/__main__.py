"""``python -m lmdistill`` (and ``accelerate launch -m lmdistill``)."""

import sys

from .cli import main

sys.exit(main())
