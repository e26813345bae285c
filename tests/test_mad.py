"""MAD, merged attention (backend/engine/sync/mad.py), on the tiny random model: exactness where nothing overlaps,
block selection and restore, τ = 0 is MultiDiffusion bit for bit, merging really spans all views, projected
views, and the merge/split operator at a feature resolution (constants, wrap equivariance)."""

import dataclasses

import pytest
import torch

from backend.sphere.canvas import Canvas, CropView
from backend.engine.denoiser import GuidedUNetDenoiser
from backend.engine.models import ModelCache
from backend.app.job import check_request
from backend.engine.generation import initial_noise, make_scheduler
from backend.request import GenerateRequest
from backend.engine.sampler import Synchronisation, sample_canvas
from backend.engine.sync import mad as mad_module
from backend.engine.sync.mad import MergedAttention, MergedAttentionProcessor, check_mad, merge_views, split_canvas
from backend.request import parse_mad_blocks
from backend.sphere.view_sets import CanvasViews, canvas_views


@pytest.fixture(scope="module")
def model(tiny_model):
    return ModelCache().get(check_request(GenerateRequest(prompt="a canyon", model=tiny_model, device="cpu", out="/unused")))


def _denoiser(model, prompts=("a canyon",), view_prompts=None):
    embeds, negative = model.pipeline.encode_prompt(list(prompts), model.device, 1, True, None)
    return GuidedUNetDenoiser(model.pipeline.unet, embeds, negative[:1], 7.5, view_prompts)


def _latents(count, size=16, seed=0):
    return torch.randn(count, 4, size, size, generator=torch.Generator().manual_seed(seed))


def _timestep():
    return torch.tensor(500)


def test_one_view_covering_the_canvas_is_the_original_attention(model):
    canvas = Canvas("wide", 16, 16)
    views = CanvasViews(canvas, [CropView(0, 0, 16, 16)])
    denoiser = _denoiser(model)
    latents = _latents(1)
    expected = denoiser(latents, _timestep(), [0])
    with MergedAttention(model.pipeline.unet, views, steps=1) as mad:
        mad.begin_step(0)
        merged = mad.wrap(denoiser)(latents, _timestep(), [0])
        assert all(processor.merged_calls == 1 for processor in mad.processors.values())
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)


def test_only_the_selected_blocks_get_merged_attention_and_remove_restores_them(model):
    unet = model.pipeline.unet
    before = dict(unet.attn_processors)
    views = canvas_views(Canvas("equirect", 16, 32), None, 16, 8)
    mad = MergedAttention(unet, views, steps=3, blocks=("mid",)).install()
    after = unet.attn_processors
    ours = {key for key in after if isinstance(after[key], MergedAttentionProcessor)}
    assert ours == {key for key in before if key.startswith("mid_block.")}
    assert all(after[key] is before[key] for key in before if not key.startswith("mid_block."))
    assert len({id(after[key]) for key in after if key.startswith("mid_block.")}) == 2  # attn1 and attn2, one object each
    assert all(after[key].original is before[key] for key in after if key.startswith("mid_block."))
    mad.remove()
    assert all(unet.attn_processors[key] is before[key] for key in before)
    with MergedAttention(unet, views, steps=3, blocks="down,up"):
        inside = unet.attn_processors
        assert {key for key in inside if isinstance(inside[key], MergedAttentionProcessor)} == {
            key for key in before if key.startswith(("down_blocks.", "up_blocks."))}
    assert all(unet.attn_processors[key] is before[key] for key in before)
    with pytest.raises(ValueError, match="--mad-blocks"):
        parse_mad_blocks("down,middle")


def _sample(model, views, steps, mad=None, view_batch=2, noise_seed=3):
    denoiser = _denoiser(model)
    if mad is not None:
        denoiser = mad.wrap(denoiser)
    noise = initial_noise(noise_seed, (1, 4, views.canvas.height, views.canvas.width), model.device, model.dtype)
    scheduler = make_scheduler("ddim", model.pipeline.scheduler.config)
    return sample_canvas(denoiser, scheduler, views, noise, steps=steps, view_batch=view_batch,
                         sync=Synchronisation(merged_attention=mad))


def test_no_merged_steps_is_multidiffusion_bit_for_bit(model):
    views = canvas_views(Canvas("equirect", 16, 32), None, 16, 8)  # four windows, one crossing the seam
    expected = _sample(model, views, 3)
    with MergedAttention(model.pipeline.unet, views, steps=0) as mad:
        result = _sample(model, views, 3, mad)
        assert all(processor.merged_calls == 0 for processor in mad.processors.values())
    assert torch.equal(result, expected)


def test_merged_steps_attend_over_all_views_at_once(model, monkeypatch):
    views = canvas_views(Canvas("equirect", 16, 32), None, 16, 8)
    batches = []

    def spy(feature_views, tokens, branches):
        batches.append((len(feature_views), tokens.shape[0], branches))
        return merge_views(feature_views, tokens, branches)

    monkeypatch.setattr(mad_module, "merge_views", spy)
    multidiffusion = _sample(model, views, 3)
    with MergedAttention(model.pipeline.unet, views, steps=2) as mad:
        result = _sample(model, views, 3, mad)
        # The sampler batches every view while merging, so each layer merges once per merged step.
        assert len(mad.processors) == 8 and all(processor.merged_calls == 2 for processor in mad.processors.values())
    assert batches and all(batch == (4, 8, 2) for batch in batches)  # 4 views x (uncond, cond)
    assert torch.isfinite(result).all()
    assert (result - multidiffusion).abs().max() > 1e-3


def test_a_batch_in_any_order_or_a_subset_merges_consistently(model):
    # SyncDiffusion's gradient pass predicts chunks of views in its own order.
    views = canvas_views(Canvas("equirect", 16, 32), None, 16, 8)
    denoiser = _denoiser(model)
    latents = _latents(4, seed=1)
    with MergedAttention(model.pipeline.unet, views, steps=1) as mad:
        mad.begin_step(0)
        predict = mad.wrap(denoiser.predict)
        ordered = predict(latents, _timestep(), [0, 1, 2, 3])
        shuffled = predict(latents[[2, 0, 3, 1]], _timestep(), [2, 0, 3, 1])
        torch.testing.assert_close(shuffled, ordered[[2, 0, 3, 1]], atol=1e-5, rtol=1e-5)
        # Windows 0 and 1 leave a quarter of the canvas unseen: they attend among the pixels they see, as
        # the same two windows on a canvas of just those pixels do.
        pair = predict(latents[[1, 0]], _timestep(), (1, 0))
    alone = CanvasViews(Canvas("wide", 16, 24), [CropView(0, 0, 16, 16), CropView(0, 8, 16, 16)])
    with MergedAttention(model.pipeline.unet, alone, steps=1) as mad:
        mad.begin_step(0)
        expected = mad.wrap(denoiser.predict)(latents[[0, 1]], _timestep(), (0, 1))
    torch.testing.assert_close(pair, expected[[1, 0]], atol=1e-5, rtol=1e-5)
    assert (pair - denoiser.predict(latents[[1, 0]], _timestep(), (1, 0))).abs().max() > 1e-4


def test_per_view_prompts_keep_cross_attention_per_view(model):
    views = canvas_views(Canvas("equirect", 16, 32), None, 16, 8)
    denoiser = _denoiser(model, ("a canyon", "a canyon, sky"), [0, 1, 0, 0])
    with MergedAttention(model.pipeline.unet, views, steps=1) as mad:
        mad.begin_step(0)
        result = mad.wrap(denoiser)(_latents(4), _timestep(), range(4))
        calls = {name.rsplit(".", 1)[-1]: processor.merged_calls for name, processor in mad.processors.items()}
    assert calls == {"attn1": 1, "attn2": 0} and torch.isfinite(result).all()


@pytest.mark.parametrize("view_set", ["cube", "ring"])
def test_projected_views_merge_through_the_sphere(model, view_set):
    views = canvas_views(Canvas("equirect", 32, 64), view_set, 16, 8)
    denoiser = _denoiser(model)
    noise = initial_noise(3, (1, 4, 32, 64), model.device, model.dtype)
    own = initial_noise(5, (len(views.projected), 4, 16, 16), model.device, model.dtype)
    scheduler = make_scheduler("ddim", model.pipeline.scheduler.config)
    with MergedAttention(model.pipeline.unet, views, steps=2) as mad:
        result = sample_canvas(mad.wrap(denoiser), scheduler, views, noise, steps=2, view_batch=4,
                               sync=Synchronisation("clean", merged_attention=mad), projected_noise=own)
        assert all(processor.merged_calls == 2 for processor in mad.processors.values())
    assert result.shape == (1, 4, 32, 64) and torch.isfinite(result).all()


def test_views_that_do_not_divide_at_a_block_are_refused(model):
    # band+poles on a 32-row canvas puts its window rows at 5 and 11: odd, so not at half resolution.
    views = canvas_views(Canvas("equirect", 32, 64), "band+poles", 16, 8)
    with pytest.raises(ValueError, match="--mad-blocks"):
        check_mad(model.pipeline.unet, views, ("down", "mid", "up"))
    with pytest.raises(ValueError, match="multiples of 2"):
        MergedAttention(model.pipeline.unet, views, 15)
    assert set(check_mad(model.pipeline.unet, canvas_views(Canvas("tile", 32, 32), None, 16, 8))) == {2}


@pytest.mark.parametrize("view_set", ["band", "cube", "band+poles"])
def test_merging_and_splitting_a_constant_gives_the_constant(view_set):
    # 72 rows: band+poles' window rows start at 12, a multiple of 4 (at 64 rows they start at 10).
    views = canvas_views(Canvas("equirect", 72, 144), view_set, 32, 8).at_resolution(4)
    tokens = torch.full((len(views) * 2, 8 * 8, 5), 0.3)
    canvas = merge_views(views, tokens, 2)
    assert canvas.shape == (2, 18 * 36, 5)
    torch.testing.assert_close(canvas, torch.full_like(canvas, 0.3))
    torch.testing.assert_close(split_canvas(views, canvas), tokens)


def test_merge_keeps_the_branches_apart_and_split_reads_crops_exactly():
    views = canvas_views(Canvas("tile", 16, 16), None, 8, 4).at_resolution(2)
    canvas = torch.randn(2, 8 * 8, 3)
    tokens = split_canvas(views, canvas)
    assert tokens.shape == (len(views) * 2, 16, 3)
    torch.testing.assert_close(merge_views(views, tokens, 2), canvas)  # crops: split then merge is exact


def test_merged_self_attention_turns_with_the_equirect_canvas(model):
    # Shifting an equirect canvas by one stride maps the windows onto each other (the last one wraps), so
    # merged self-attention of the views shifted by one equals the result shifted by one.
    views = canvas_views(Canvas("equirect", 16, 32), None, 16, 8)
    attn = model.pipeline.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1
    hidden = torch.randn(4 * 2, 8 * 8, attn.query_dim, generator=torch.Generator().manual_seed(2))
    with MergedAttention(model.pipeline.unet, views, steps=1) as mad:
        mad.begin_step(0)
        mad.batch_views = (0, 1, 2, 3)
        out = attn(hidden)
        turned = attn(hidden.unflatten(0, (4, 2)).roll(1, 0).flatten(0, 1))
    torch.testing.assert_close(turned, out.unflatten(0, (4, 2)).roll(1, 0).flatten(0, 1), atol=1e-5, rtol=1e-5)
    unmerged = attn(hidden)
    assert (unmerged - out).abs().max() > 1e-4


def test_gradients_through_merged_attention_survive_gradient_checkpointing(model):
    # SyncDiffusion differentiates the prediction, with --sync-checkpointing through blocks whose forward
    # runs again during the backward pass, after the wrapped call has returned: it must merge again.
    views = canvas_views(Canvas("equirect", 16, 32), None, 16, 8)
    unet, denoiser, latents = model.pipeline.unet, _denoiser(model), _latents(4, seed=4)

    def gradient():
        with MergedAttention(unet, views, steps=1) as mad:
            mad.begin_step(0)
            inputs = latents.clone().requires_grad_(True)
            prediction = mad.wrap(denoiser.predict)(inputs, _timestep(), range(4))
            return torch.autograd.grad(prediction.square().sum(), inputs)[0]

    plain = gradient()
    unet.enable_gradient_checkpointing()
    try:
        checkpointed = gradient()
    finally:
        unet.disable_gradient_checkpointing()
    assert plain.abs().max() > 0
    torch.testing.assert_close(checkpointed, plain, atol=1e-6, rtol=1e-6)


def test_block_resolutions_read_from_the_config_match_the_model(model):
    unet = model.pipeline.unet
    assert mad_module.block_divisors(unet) == mad_module.block_divisors(unet.config) == {"down1": 2, "mid": 2, "up0": 2}
    sd = {"down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "mid_block_type": "UNetMidBlock2DCrossAttn",
          "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}
    assert mad_module.block_divisors(sd) == {"down0": 1, "down1": 2, "down2": 4, "mid": 8, "up1": 4, "up2": 2, "up3": 1}
    assert mad_module.block_divisors(sd, "mid") == {"mid": 8}


# ---------------------------------------------------------------- the job and the command line

def _job(tiny_model, tmp_path, name, **settings):
    import json

    import numpy as np
    from PIL import Image

    from backend.app.job import run_job

    base = dict(prompt="a canyon", layout="equirect", width=512, height=256, steps=3, seed=1, window=16, stride=4,
                model=tiny_model, device="cpu", out=str(tmp_path / name))
    outputs = run_job(check_request(GenerateRequest(**{**base, **settings})), models=JOB_MODELS)
    return json.loads(open(outputs["metadata"]).read()), np.asarray(Image.open(outputs["png"]))


JOB_MODELS = ModelCache()


@pytest.mark.parametrize("settings", [
    dict(),
    dict(sync="syncdiffusion", sync_steps=2, sync_loss="lpips-alex", sync_loss_backbone="random"),
    dict(sync="syncsde"),
    dict(views="ring"),
], ids=["multidiffusion", "syncdiffusion", "syncsde", "ring"])
def test_mad_composes_with_every_method_through_the_job(tiny_model, tmp_path, settings):
    metadata, image = _job(tiny_model, tmp_path, "mad", mad_steps=2, **settings)
    assert metadata["mad"] == {"steps": 2, "blocks": ["down", "mid", "up"]}
    assert metadata["view_set"] == settings.get("views", "band+poles")  # the default set, rows aligned for MAD
    _, plain = _job(tiny_model, tmp_path, "plain", **settings)
    assert not (image == plain).all()
    # The cached UNet got its own processors back.
    unet = JOB_MODELS.get(check_request(GenerateRequest(prompt="x", model=tiny_model, device="cpu", out="/unused"))).pipeline.unet
    assert not any(isinstance(processor, MergedAttentionProcessor) for processor in unet.attn_processors.values())


def test_band_and_poles_rows_are_aligned_for_mad(tiny_model):
    from backend.engine.resolve import choose_views

    request = GenerateRequest(prompt="x", layout="equirect", width=512, height=256, window=16, stride=4,
                              model=tiny_model, device="cpu", out="/unused", mad_steps=2)
    checked = check_request(request)
    unet = JOB_MODELS.get(checked).pipeline.unet
    views = checked.resolved.views
    assert all(crop.top % 2 == 0 for crop in views.crops)  # the tiny UNet's features are at most 2x smaller
    assert [crop.top for crop in choose_views(checked.params, 8, unet)[1].crops] == [crop.top for crop in views.crops]
    _, plain, _ = choose_views(dataclasses.replace(checked.resolved.params, mad_steps=0), 8, unet)
    assert {crop.top for crop in plain.crops} != {crop.top for crop in views.crops}  # 5 -> 4: rounded outward


@pytest.mark.parametrize("args,message", [
    (["--mad-steps", "-1"], "--mad-steps must be 0 (off) or more steps"),
    (["--mad-steps", "2", "--mad-blocks", "middle"], "--mad-blocks takes a comma-separated list of down, mid, up"),
    (["--mad-steps", "2", "--views", "band", "--stride", "3"], "MAD cannot merge these views"),
])
def test_bad_mad_flags_are_one_sentence_and_exit_2(tiny_model, tmp_path, capsys, args, message):
    from backend.app.cli import main

    out = tmp_path / "out"
    code = main(["generate", "--prompt", "x", "--model", tiny_model, "--out", str(out), "--layout", "equirect",
                 "--width", "512", "--height", "256", "--window", "16", "--device", "cpu", *args])
    error = capsys.readouterr().err.strip()
    assert code == 2 and message in error and len(error.splitlines()) == 1
    assert not out.exists()
