"""``python -m backend``: see backend/app/cli.py."""

import logging
import os
import sys

# On Apple Silicon, operations MPS lacks run on the CPU instead of failing the job. PyTorch reads this when
# it is imported, so it is set before anything imports torch; a value the user set is kept.
os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")
# huggingface_hub logs every retry of a request it cannot make ("'...' thrown while requesting HEAD ...",
# "Retrying in 1s [Retry 1/5]"): six raw lines before our one sentence saying the hub cannot be reached. Its
# errors still show. It reads this when it is imported; a value the user set is kept.
os.environ.setdefault("HF_HUB_VERBOSITY", "error")
# Where torchao is installed (--quantize), transformers and diffusers import it while loading a model, and two
# warnings per job follow that are not the user's concern: torch calls torchao's registration of its Enums with
# torch's pytree deprecated, and diffusers cannot find the tensor classes of older torchao releases (which only
# checkpoints saved quantised need; --quantize quantises after loading).
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
logging.getLogger("diffusers.quantizers.torchao.torchao_quantizer").setLevel(logging.ERROR)

from .app.cli import main  # noqa: E402  (after the environment above)

sys.exit(main())
