"""Shared fixtures: a tiny random Stable Diffusion model saved as a diffusers folder, no network.

Also makes the repository importable as the package ``syncsphere`` (see ``register_extension_package``), so the
add-on's plain-Python modules are imported as what they are, ``syncsphere.blender_addon.core.*``, without Blender.
"""

import importlib.util
import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

REPO = Path(__file__).resolve().parent.parent

EXTENSION_PACKAGE = "syncsphere"
"""The name the repository folder is imported under in tests; Blender imports it as
``bl_ext.<repository>.syncsphere``. The folder's own name differs between checkouts, so it is not used."""


def register_extension_package():
    """Put the repository folder into ``sys.modules`` as the package ``syncsphere`` without running its
    ``__init__.py`` (which imports the operators and panels, and with them bpy). Its sub-packages then import
    normally, relative imports included: ``importlib.import_module("syncsphere.blender_addon.core.generation")``
    loads that module and what it imports (``syncsphere.backend.request``), and nothing of Blender's.
    Returns the package; a second call returns the one already registered."""
    if EXTENSION_PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(EXTENSION_PACKAGE, REPO / "__init__.py",
                                                      submodule_search_locations=[str(REPO)])
        sys.modules[EXTENSION_PACKAGE] = importlib.util.module_from_spec(spec)
    return sys.modules[EXTENSION_PACKAGE]


# Before any test module is collected, so they import ``syncsphere.blender_addon.core`` at their top.
register_extension_package()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """Path of a tiny random SD model (VAE factor 8, UNet sample size 32) saved with save_pretrained."""
    from model_factory import save_random_sd_model  # imported here: the Blender-only run has no torch

    return save_random_sd_model(str(tmp_path_factory.mktemp("models") / "tiny-sd"))


TOY_MODEL_PLACES = (os.environ.get("SYNCSPHERE_TOY_MODEL", ""), str(REPO.parent / "shared" / "models" / "toy-landscape"),
                    "/work/shared/models/toy-landscape")


@pytest.fixture(scope="session")
def toy_model() -> str:
    """Path of the shared development model ``toy-landscape`` (4 px per latent, 8-latent window; it paints smooth
    skies and grounds, so seams are measurable on it): $SYNCSPHERE_TOY_MODEL, or ``shared/models`` beside the
    checkout. Skips the test where neither exists."""
    for place in TOY_MODEL_PLACES:
        if place and os.path.isfile(os.path.join(place, "model_index.json")):
            return place
    pytest.skip("the development model toy-landscape is not on this machine (set SYNCSPHERE_TOY_MODEL)")


@pytest.fixture(scope="module")
def denoiser_and_model(tiny_model):
    """(the tiny model's UNet as a ``GuidedUNetDenoiser`` for "a pine forest" at guidance 7.5, the loaded model),
    for tests that call the denoising loop directly."""
    from backend.app.job import check_request
    from backend.engine.denoiser import GuidedUNetDenoiser
    from backend.engine.models import ModelCache
    from backend.request import GenerateRequest

    request = GenerateRequest(prompt="a pine forest", model=tiny_model, device="cpu", out="/nonexistent-unused")
    model = ModelCache().get(check_request(request))
    prompt_embeds, negative_embeds = model.pipeline.encode_prompt("a pine forest", model.device, 1, True, None)
    return GuidedUNetDenoiser(model.pipeline.unet, prompt_embeds, negative_embeds, 7.5), model
