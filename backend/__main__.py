"""``python -m backend``: see backend/cli.py."""

import sys

from .cli import main

sys.exit(main())
