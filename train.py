"""The original report's command line: ``python train.py --batch-size 2 --epochs 1``.

A thin wrapper over ``lmdistill train`` (same flags; see ``lmdistill train --help``).
"""

import sys
from pathlib import Path

try:
    from lmdistill.cli import main
except ImportError:  # running from a checkout that was not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))
    from lmdistill.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
