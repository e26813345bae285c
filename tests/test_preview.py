"""The preview while it paints (issue 21): the loop's predicted clean canvas on the preview steps, its projection to
RGB (the linear one against the toy model's VAE decode; the tiny autoencoder's path), the preview PNG in the job
folder, and the protocol's progress events that name it before the job ends."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from backend.app.cli import main
from backend.app.job import check_request
from backend.engine.decode import decode_canvas
from backend.engine.generation import denoise
from backend.engine.models import ModelCache
from backend.engine.preview import (LATENT_RGB_FACTORS, LinearPreview, TinyAutoencoderPreview, canvas_preview,
                                    latent_family)
from backend.engine.sampler import preview_steps
from backend.products.outputs import PREVIEW_NAME, PreviewFile
from backend.request import DEFAULT_PREVIEW_EVERY, GenerateRequest
from test_server import Worker, params

MODELS = ModelCache()


def denoised_with_previews(model_path, out, **overrides):
    """Denoise a request for ``model_path`` through the engine's own stage (``generation.denoise``), recording the
    loop's reports: (final canvas latent, canvas, [(step, preview latent or None)], the loaded model)."""
    values = dict(prompt="a harbour", model=model_path, device="cpu", out=str(out), seed=3, view_batch=4)
    checked = check_request(GenerateRequest(**{**values, **overrides}))
    model = MODELS.get(checked)
    reports = []
    latents, canvas, _ = denoise(checked.resolved_for(model), model,
                                 lambda stage, step, total, preview: reports.append((step, preview)))
    return latents, canvas, reports, model


# ------------------------------------------------------------------ which steps, and what the loop hands over


def test_preview_steps_are_every_nth_and_the_last():
    assert preview_steps(12, 5) == (5, 10, 12)
    assert preview_steps(10, 5) == (5, 10)
    assert preview_steps(3, 1) == (1, 2, 3)
    assert preview_steps(4, 50) == (4,)  # a few-step job still gets its last one
    assert preview_steps(30, 0) == ()
    assert DEFAULT_PREVIEW_EVERY == 5


@pytest.mark.parametrize("case", [
    dict(layout="wide", width=512, height=128, window=16, stride=8, schedule="dense"),           # fusion noisy
    dict(layout="tile", width=128, height=128, window=16, schedule="shifted"),                   # fusion canvas
    dict(layout="equirect", width=512, height=256, window=16, stride=8, views="band+poles"),     # fusion clean
    dict(layout="wide", width=512, height=128, window=16, stride=8, sync="syncsde"),             # fusion own
], ids=["noisy", "canvas", "clean", "own"])
def test_the_loop_hands_the_predicted_clean_canvas_on_the_preview_steps(tiny_model, tmp_path, case):
    """Every fusion: a (1, C, H, W) latent on steps 2 and 4 of 4 and on no other; at the last step it is the final
    canvas (DDIM's last step lands on its x0, up to the last alpha). The toy-model test below shows it is the
    picture, not noise."""
    latents, _, reports, _ = denoised_with_previews(tiny_model, tmp_path / "out", steps=4, preview_every=2, **case)
    assert [step for step, _ in reports] == [1, 2, 3, 4]
    assert [step for step, preview in reports if preview is not None] == [2, 4]
    last = reports[-1][1]
    assert last.shape == latents.shape and torch.isfinite(last).all()
    assert float((last - latents).norm() / latents.norm()) < 0.1


def test_no_preview_latents_with_preview_every_0(tiny_model, tmp_path):
    _, _, reports, _ = denoised_with_previews(tiny_model, tmp_path / "out", layout="tile", width=128, height=128,
                                              window=16, steps=3, preview_every=0)
    assert [preview for _, preview in reports] == [None, None, None]


# ------------------------------------------------------------------ the projection


def fit_latent_rgb(latents, images, factor):
    """Least-squares (C x 3 matrix, bias (3,)) with ``images`` ≈ ``latents`` @ matrix + bias per latent pixel, the
    images (1, 3, H·f, W·f) in [0, 1] averaged over f x f blocks and mapped to [-1, 1] as the VAE outputs them:
    how such factors are fitted to a VAE, here the toy model's."""
    rows, targets = [], []
    for latent, image in zip(latents, images):
        channels, height, width = latent.shape[1:]
        rows.append(latent[0].permute(1, 2, 0).reshape(-1, channels).numpy())
        blocks = image[0].permute(1, 2, 0).numpy().reshape(height, factor, width, factor, 3).mean(axis=(1, 3))
        targets.append(blocks.reshape(-1, 3) * 2 - 1)
    rows = np.concatenate(rows)
    solution, *_ = np.linalg.lstsq(np.c_[rows, np.ones(len(rows))], np.concatenate(targets), rcond=None)
    return solution[:-1], solution[-1]


def test_the_linear_projection_is_close_to_the_vae_decode_on_the_toy_model(toy_model, tmp_path):
    """The toy model's nine sky x ground modes, one canvas each, 10 DDIM steps; for each, factors fitted to the
    VAE on the other eight, and the canvas's last preview latent projected with them against the VAE decode of
    the canvas (averaged to the latent grid). Its picture has the canvas's aspect and follows the decode: the
    luminance correlates (0.55-0.94 here, median 0.88; the toy VAE is small and nonlinear: a linear fit explains
    about 78 % of its variance), where the same picture upside down does not, and the colours are near."""
    weights = np.array([0.2126, 0.7152, 0.0722])
    runs = []
    modes = [f"{sky} {ground}" for sky in ("noon", "sunset", "night") for ground in ("grass", "sand", "snow")]
    for seed, prompt in enumerate(modes):
        latents, canvas, reports, model = denoised_with_previews(
            toy_model, tmp_path / "out", prompt=prompt, seed=seed, layout="equirect", width=128, height=64, steps=10,
            preview_every=10)
        runs.append((latents, reports[-1][1], decode_canvas(model.pipeline.vae, latents, canvas)))
    factor = model.geometry.vae_scale_factor
    correlations = []
    for held_out, (_, preview_latent, decoded) in enumerate(runs):
        others = [run for index, run in enumerate(runs) if index != held_out]
        preview = LinearPreview(*fit_latent_rgb([run[0] for run in others], [run[2] for run in others], factor))(preview_latent)
        assert preview.shape == (16, 32, 3) and preview.dtype == np.float32  # the latent grid: 2:1 like the canvas
        reference = decoded[0].permute(1, 2, 0).numpy().reshape(16, factor, 32, factor, 3).mean(axis=(1, 3))
        correlation = np.corrcoef((preview @ weights).ravel(), (reference @ weights).ravel())[0, 1]
        upside_down = np.corrcoef((preview[::-1] @ weights).ravel(), (reference @ weights).ravel())[0, 1]
        assert correlation > 0.5 and correlation > upside_down + 0.3, (modes[held_out], correlation, upside_down)
        assert np.abs(preview - reference).mean() < 0.2, modes[held_out]
        correlations.append(correlation)
    assert np.median(correlations) > 0.8, correlations


def test_the_families_and_the_linear_preview_when_no_tiny_autoencoder_is_cached(monkeypatch):
    import backend.engine.preview as preview

    assert latent_family({"latent_channels": 4, "scaling_factor": 0.18215}) == "sd"  # SD 1.x and 2.x
    assert latent_family({"latent_channels": 4, "scaling_factor": 0.13025}) == "sdxl"
    assert latent_family({"latent_channels": 4, "scaling_factor": 0.52}) == "sd"  # an unknown 4-channel VAE
    assert latent_family({"latent_channels": 16, "scaling_factor": 1.5305}) is None
    monkeypatch.setattr(preview, "is_tiny_autoencoder_cached", lambda hub_id: False)
    linear = canvas_preview({"latent_channels": 4, "scaling_factor": 0.13025}, 8, torch.device("cpu"), torch.float32)
    assert linear.name == "linear"
    matrix, bias = LATENT_RGB_FACTORS["sdxl"]
    assert torch.equal(linear.matrix, torch.tensor(matrix)) and torch.equal(linear.bias, torch.tensor(bias))
    # A latent of channel c = 1 elsewhere 0: the pixel is that channel's row (+ bias), mapped from [-1, 1] to [0, 1].
    latent = torch.zeros(1, 4, 2, 6, dtype=torch.float16)
    latent[0, 1] = 1.0
    expected = np.clip((np.array(matrix[1]) + np.array(bias) + 1) / 2, 0, 1)
    np.testing.assert_allclose(linear(latent), np.broadcast_to(expected, (2, 6, 3)), atol=1e-6)
    warnings = []
    assert canvas_preview({"latent_channels": 16}, 8, torch.device("cpu"), torch.float32, warnings.append) is None
    assert "no preview" in warnings[0]


def test_the_tiny_autoencoder_is_used_when_cached_and_its_preview_is_at_most_1024_px_wide(tmp_path, monkeypatch):
    """A real diffusers AutoencoderTiny (random weights, a small config) saved to a folder stands in for the cached
    TAESD: it decodes the preview at the image's resolution, a wide canvas averaged down to 1024 px first."""
    import backend.engine.preview as preview
    from diffusers import AutoencoderTiny

    folder = tmp_path / "taesd"
    AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                    num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1)).save_pretrained(folder)
    monkeypatch.setitem(preview.TINY_AUTOENCODER_OF_FAMILY, "sd", str(folder))
    monkeypatch.setattr(preview, "is_tiny_autoencoder_cached", lambda hub_id: hub_id == str(folder))
    decoder = canvas_preview({"latent_channels": 4, "scaling_factor": 0.18215}, 8, torch.device("cpu"), torch.float32)
    assert isinstance(decoder, TinyAutoencoderPreview) and decoder.name == "taesd"
    small = decoder(torch.randn(1, 4, 8, 16))
    assert small.shape == (64, 128, 3) and 0 <= small.min() and small.max() <= 1
    wide = decoder(torch.randn(1, 4, 32, 256))  # 2048 px wide: halved before decoding
    assert wide.shape == (128, 1024, 3)


# ------------------------------------------------------------------ the file, the protocol and the CLI


def test_the_preview_file_is_replaced_whole_and_removed_with_the_folder_it_made(tmp_path):
    out = tmp_path / "job"
    preview = PreviewFile(str(out))
    path = preview.write(np.zeros((4, 8, 3)))
    assert path == str(out / PREVIEW_NAME) and Image.open(path).size == (8, 4)
    preview.write(np.ones((6, 12, 3)))
    assert Image.open(path).size == (12, 6) and sorted(os.listdir(out)) == [PREVIEW_NAME]  # no partial files left
    preview.remove()
    assert not out.exists()  # the folder was the preview's: gone with it
    out.mkdir()
    (out / "mine.txt").write_text("the user's")
    with PreviewFile(str(out)) as kept:
        kept.write(np.zeros((2, 2, 3)))
    assert sorted(os.listdir(out)) == ["mine.txt"]


def test_previews_arrive_through_the_protocol_before_the_job_ends_and_leave_nothing(tiny_model, tmp_path):
    """The stdio worker: progress events name the preview PNG on steps 2, 4, 6 and 8 of 8, before done; the PNG
    exists when its event arrives and has the canvas's aspect (512 x 128 px / 8); the finished folder holds the
    outputs only, and metadata.json counts the previews. A job cancelled after its first preview leaves no folder."""
    worker = Worker()
    try:
        out = tmp_path / "wide"
        worker.send({"op": "generate", "job": "w", "out_dir": str(out),
                     "params": params(tiny_model, layout="wide", width=512, height=128, steps=8, preview_every=2)})
        events, sizes = [], []
        while not events or events[-1]["event"] not in ("done", "error"):
            events.append(worker.next_event())
            if events[-1].get("preview"):
                with Image.open(events[-1]["preview"]) as image:  # read at once: the file is rewritten in place
                    sizes.append(image.size)
        assert events[-1]["event"] == "done", events[-1]
        previews = [(event["stage"], event["step"], event["preview"]) for event in events if event.get("preview")]
        assert [(stage, step) for stage, step, _ in previews] == [("denoising", step) for step in (2, 4, 6, 8)]
        assert {path for _, _, path in previews} == {str(out / PREVIEW_NAME)}
        assert sizes[0] == (64, 16)  # the first for sure; later ones may already be gone when read
        assert not (out / PREVIEW_NAME).exists() and not [name for name in os.listdir(out) if "syncsphere" in name]
        metadata = json.loads((out / "metadata.json").read_text())
        assert metadata["preview"]["count"] == 4 and metadata["preview"]["decoder"] in ("linear", "taesd")
        assert metadata["params"]["preview_every"] == 2

        cancelled = tmp_path / "cancelled"
        worker.send({"op": "generate", "job": "c", "out_dir": str(cancelled),
                     "params": params(tiny_model, steps=200, preview_every=1)})
        first = worker.until(lambda event: event.get("preview") is not None)[-1]
        assert os.path.isfile(first["preview"])
        worker.send({"op": "cancel", "job": "c"})
        end = worker.until(lambda event: event["event"] in ("done", "error"))[-1]
        assert end["kind"] == "cancelled" and not cancelled.exists()
    finally:
        worker.send({"op": "shutdown"})
        worker.process.wait(timeout=60)


def test_the_cli_sends_previews_with_json_progress_only(tiny_model, tmp_path, capsys):
    args = ["generate", "--prompt", "a harbour", "--layout", "tile", "--width", "128", "--height", "128", "--steps", "2",
            "--window", "16", "--seed", "1", "--device", "cpu", "--model", tiny_model]
    assert main(args + ["--out", str(tmp_path / "json"), "--json-progress", "--preview-every", "1"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [event["step"] for event in events if event.get("preview")] == [1, 2]
    # A progress bar shows no pictures: none are written, and metadata.json says so.
    assert main(args + ["--out", str(tmp_path / "bar"), "--preview-every", "1"]) == 0
    metadata = json.loads((tmp_path / "bar" / "metadata.json").read_text())
    assert "preview" not in metadata and metadata["params"]["preview_every"] == 0
    capsys.readouterr()
    assert main(args + ["--out", str(tmp_path / "bad"), "--preview-every", "-1"]) == 2
    assert "--preview-every must be 0 (no previews) or a number of steps, not -1." in capsys.readouterr().err


def test_the_addons_job_keeps_the_latest_preview_and_counts_them():
    """``worker_client.GenerationJob`` as the events arrive: the path of the last preview, the step it shows and how
    many came; events without one (or with anything but a path) leave them as they were."""
    from backend import protocol
    from syncsphere.blender_addon.core import worker_client

    job = worker_client.GenerationJob(worker=None, params={}, out_dir=os.path.abspath("out"))
    job.state = "running"
    seen = []
    for step, preview in ((1, None), (5, "/out/.syncsphere-preview.png"), (6, None), (10, "/out/.syncsphere-preview.png"),
                          (11, 42), (12, "")):
        job._handle(protocol.parse_event(protocol.encode(protocol.progress_event(job.id, "denoising", step, 12, preview))))
        seen.append((job.preview, job.preview_step, job.preview_count))
    assert seen == [(None, 0, 0), ("/out/.syncsphere-preview.png", 5, 1), ("/out/.syncsphere-preview.png", 5, 1),
                    ("/out/.syncsphere-preview.png", 10, 2), ("/out/.syncsphere-preview.png", 10, 2),
                    ("/out/.syncsphere-preview.png", 10, 2)]
    # The next stage's events (read in the same poll as the last preview when the machine is busy) change the
    # progress, not the step and total the preview is of.
    job._handle(protocol.parse_event(protocol.encode(protocol.progress_event(job.id, "decoding", 1, 4, None))))
    assert (job.stage, job.step, job.total) == ("decoding", 1, 4)
    assert (job.preview_step, job.preview_total) == (10, 12)
