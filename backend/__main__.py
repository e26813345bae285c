"""``python -m backend``: see backend/app/cli.py."""

import os
import sys

# On Apple Silicon, operations MPS lacks run on the CPU instead of failing the job. PyTorch reads this when
# it is imported, so it is set before anything imports torch; a value the user set is kept.
os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")

from .app.cli import main  # noqa: E402  (after the environment above)

sys.exit(main())
