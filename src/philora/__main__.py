"""``python -m philora`` (and ``torchrun -m philora train ...``) runs the CLI."""

import sys

from .cli import main

sys.exit(main())
