"""One resolved request (issue 15, items 2 and 3): ``check_request`` decides everything once and returns it
frozen, a job builds its view set once, and the sampler refuses synchronisations that cannot run."""

import dataclasses
import json

import pytest
import torch

from backend.app.job import check_request, run_job
from backend.engine import resolve
from backend.engine.models import ModelCache
from backend.engine.sampler import Synchronisation, sample_canvas
from backend.request import GenerateRequest
from backend.sphere.canvas import Canvas
from backend.sphere.view_sets import CanvasViews


def _request(tiny_model, out, **settings) -> GenerateRequest:
    return GenerateRequest(**{"prompt": "a canyon", "layout": "equirect", "width": 256, "height": 128, "steps": 2,
                              "window": 8, "model": tiny_model, "device": "cpu", "out": str(out), **settings})


def test_check_request_decides_everything_once_and_changes_nothing_it_was_given(tiny_model, tmp_path):
    request = _request(tiny_model, tmp_path / "out", sync="syncdiffusion", sync_loss_backbone="random")
    checked = check_request(request)
    # The caller's request is as it was: no defaults written into it.
    assert (request.seed, request.stride, request.views, request.sync_weight) == (None, None, None, None)
    resolved = checked.resolved
    params = resolved.params
    assert isinstance(params.seed, int) and params.seed == checked.params.seed  # decided at check time
    assert (params.window, params.stride, params.views, resolved.fusion) == (8, 1, "band+poles", "clean")
    assert params.sync_weight == 20.0 and len(resolved.anchors) == len(resolved.views) == len(resolved.prompt_rows)
    assert params.out == str(tmp_path / "out")
    for frozen in (checked, resolved, params):
        with pytest.raises(dataclasses.FrozenInstanceError):
            frozen.seed = 1
    # Each check of a request without a seed picks one (from 2^32 seeds: three checks give three).
    assert len({check_request(request).params.seed for _ in range(3)}) == 3


def test_a_job_builds_its_view_set_once(tiny_model, tmp_path, monkeypatch):
    built = []
    real = resolve.canvas_views
    monkeypatch.setattr(resolve, "canvas_views", lambda *args: built.append(args) or real(*args))
    outputs = run_job(check_request(_request(tiny_model, tmp_path / "job", seed=3, prompt_up="sky", mad_steps=1,
                                             stride=2)), models=ModelCache())
    metadata = json.loads(open(outputs["metadata"]).read())
    assert len(built) == 1 and metadata["views"] == len(real(*built[0]))
    assert metadata["params"]["seed"] == metadata["seed"] == 3
    assert metadata["params"]["views"] == metadata["view_set"] == "band+poles"


def test_impossible_synchronisations_raise():
    with pytest.raises(ValueError, match='"own" .* needs a synchroniser'):
        Synchronisation("own")
    with pytest.raises(ValueError, match="a synchroniser needs fusion"):
        Synchronisation("noisy", synchroniser=object())
    with pytest.raises(ValueError, match="Unknown fusion 'median'"):
        Synchronisation("median")
    canvas = Canvas("wide", 8, 16)
    views = CanvasViews(canvas, canvas.crop_views(8, 4))
    noise = torch.zeros(1, 4, 8, 16)

    def denoiser(latents, timestep, indices):
        return torch.zeros_like(latents)

    from diffusers import DDIMScheduler

    with pytest.raises(TypeError):  # steps and view_batch are keywords: no silent swap of the two
        sample_canvas(denoiser, DDIMScheduler(), views, noise, 2, 3)
    with pytest.raises(ValueError, match="at least one step"):
        sample_canvas(denoiser, DDIMScheduler(), views, noise, steps=0, view_batch=3)
    latents = sample_canvas(denoiser, DDIMScheduler(), views, noise, steps=2, view_batch=3)
    assert latents.shape == noise.shape
