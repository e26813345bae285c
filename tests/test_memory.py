"""Memory modes (issue 9, item 4): ``--memory low`` gives the image of ``full`` with less held at once;
``auto`` picks from the free memory and says so in metadata.json."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderTiny
from PIL import Image

from backend.engine import memory
from backend.sphere.canvas import Canvas
from backend.engine.decode import can_decode_in_strips, decode_canvas, decode_in_strips, largest_decode_tile
from backend.errors import BadRequest
from backend.app.job import check_request, run_job
from backend.engine.models import ModelCache
from backend.engine.memory import StagePlacement, estimate_full_bytes, free_memory_bytes, plan_memory
from backend.request import GenerateRequest
from model_factory import TINY_TAESD, TINY_VAE
from test_cli import run_cli

# A VAE whose up blocks change the channel count (shortcut convs) and have several groups per norm.
CHANNEL_CHANGING_VAE = {**TINY_VAE, "block_out_channels": (8, 16, 16, 32), "norm_num_groups": 4, "layers_per_block": 2}


@pytest.fixture(scope="module")
def models():
    return ModelCache()


@pytest.mark.parametrize("config", [TINY_VAE, CHANNEL_CHANGING_VAE], ids=["tiny", "channel-changing"])
@pytest.mark.parametrize("strip_rows", [1, 5, 32])
def test_strip_decoding_equals_the_vae_decode(config, strip_rows):
    torch.manual_seed(0)
    vae = AutoencoderKL(**config).eval()
    assert can_decode_in_strips(vae)
    # Two samples, odd sizes: the strips' halos meet the image's edges at uneven places.
    latents = torch.randn(2, 4, 13, 21)
    with torch.no_grad():
        expected = vae.decode(latents).sample
    decoded = decode_in_strips(vae, latents, strip_rows)
    assert decoded.shape == expected.shape
    assert (decoded - expected).abs().max() < 1e-4 * expected.abs().max()


def test_a_decoder_it_does_not_know_is_decoded_whole():
    vae = AutoencoderTiny(**TINY_TAESD).eval()
    assert not can_decode_in_strips(vae)
    latents = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(decode_in_strips(vae, latents), vae.decode(latents).sample)


def test_tiled_canvas_decode_in_strips_is_the_same_image():
    torch.manual_seed(1)
    vae = AutoencoderKL(**TINY_VAE).eval()
    latents = torch.randn(1, 4, 24, 48)
    canvas = Canvas("equirect", 24, 48)
    tiling = dict(tile=16, overlap=4, context=4, max_single=12)  # several tiles in both directions
    whole = decode_canvas(vae, latents, canvas, **tiling)
    strips = decode_canvas(vae, latents, canvas, in_strips=True, **tiling)
    assert (whole - strips).abs().max() < 1e-5
    # Latents in another dtype than the VAE's (MPS decodes half-precision latents with a float32 VAE).
    bfloat = decode_canvas(vae, latents.to(torch.bfloat16), canvas, in_strips=True, **tiling)
    assert bfloat.dtype == torch.float32 and (bfloat - whole).abs().max() < 0.05


def _equirect(tiny_model, out, **settings) -> GenerateRequest:
    # 512x256 with window 16: the default band+poles view set, so the pole caps are decoded too.
    base = dict(prompt="a canyon", layout="equirect", width=512, height=256, steps=2, seed=3, window=16, stride=4,
                view_batch=4, model=tiny_model, device="cpu", out=str(out), no_hdr=True)
    return GenerateRequest(**{**base, **settings})


def test_low_memory_gives_the_full_image(tiny_model, tmp_path, models):
    outputs = {mode: run_job(check_request(_equirect(tiny_model, tmp_path / mode, memory=mode)), models=models)
               for mode in ("full", "low")}
    images = {mode: np.asarray(Image.open(paths["png"]), dtype=np.int16) for mode, paths in outputs.items()}
    assert np.abs(images["full"] - images["low"]).max() <= 2  # the bound: 2/255
    recorded = {mode: json.loads(open(paths["metadata"]).read()) for mode, paths in outputs.items()}
    assert recorded["full"]["view_set"] == "band+poles"
    full, low = recorded["full"]["memory"], recorded["low"]["memory"]
    assert (full["mode"], full["reason"], full["view_batch_used"], full["strip_decode"]) == ("full", "asked for", 4, False)
    assert (low["mode"], low["reason"], low["view_batch_used"], low["strip_decode"]) == ("low", "asked for", 1, True)
    assert low["offload"] is False  # the CPU is the device: nothing to offload to
    assert recorded["low"]["params"]["view_batch"] == 4  # what was asked for stays recorded


def test_auto_says_what_it_picked_and_why(tiny_model, tmp_path, models):
    outputs = run_job(check_request(_equirect(tiny_model, tmp_path / "auto")), models=models)
    recorded = json.loads(open(outputs["metadata"]).read())["memory"]
    # A tiny model on a machine with gigabytes free: full, and the numbers it compared are recorded.
    assert (recorded["requested"], recorded["mode"], recorded["reason"]) == ("auto", "full", "the job fits in the free memory")
    assert 0 < recorded["estimated_full_mib"] < recorded["free_mib"]


def test_auto_picks_low_when_the_estimate_does_not_fit():
    request = _equirect("unused", "unused", width=2048, height=1024, window=64, stride=8).validated()
    unet = {"sample_size": 64, "block_out_channels": [320, 640, 1280, 1280]}
    vae = {"block_out_channels": [128, 256, 512, 512]}
    gib = 2**30
    estimate = estimate_full_bytes(request, torch.float16, unet, vae, view_count=130)
    # SD2 base at 2048x1024 in float16: the decode tile (1152x896 px) dominates four UNet samples.
    assert largest_decode_tile(128, 256, "equirect") == (144, 112)
    assert estimate == 1152 * 896 * 128 * memory.DECODE_ELEMENTS_PER_PIXEL_CHANNEL * 2
    cuda = torch.device("cuda")
    roomy = plan_memory(request, cuda, torch.float16, unet, vae, 130, free_bytes=80 * gib)
    tight = plan_memory(request, cuda, torch.float16, unet, vae, 130, free_bytes=estimate)
    assert (roomy.mode, roomy.view_batch, roomy.offload) == ("full", 4, False)
    assert (tight.mode, tight.view_batch, tight.offload, tight.strip_decode) == ("low", 1, True, True)
    assert tight.to_dict()["free_mib"] == round(estimate / 2**20)
    # Merged attention runs all 130 views in one batch: that no longer fits in 8 GiB.
    merged = dataclasses.replace(request, mad_steps=15)
    assert plan_memory(merged, cuda, torch.float16, unet, vae, 130, free_bytes=8 * gib).mode == "low"
    # On the CPU the weights count too (they are memory-mapped, so they look free).
    cpu = torch.device("cpu")
    assert plan_memory(request, cpu, torch.float32, unet, vae, 130, free_bytes=12 * gib).mode == "full"
    assert plan_memory(request, cpu, torch.float32, unet, vae, 130, weights_bytes=5 * gib, free_bytes=12 * gib).mode == "low"


def test_free_memory_is_read_from_the_system():
    free = free_memory_bytes(torch.device("cpu"))
    with open("/proc/meminfo") as meminfo:
        total = int(next(line for line in meminfo if line.startswith("MemTotal:")).split()[1]) * 1024
    assert 0 < free <= total


class ThreeModels(torch.nn.Module):
    """Stands in for a pipeline: StagePlacement only moves its text_encoder, unet and vae."""

    def __init__(self):
        super().__init__()
        self.text_encoder, self.unet, self.vae = (torch.nn.Linear(2, 2) for _ in range(3))


def _placed(stage: str, offload: bool, vae_while_denoising: bool = False) -> dict:
    # The meta device plays the GPU: models can move onto it (not back), so each case starts from fresh models.
    models = ThreeModels()
    StagePlacement(models, torch.device("meta"), offload, vae_while_denoising, offload_device=torch.device("cpu")).enter(stage)
    return {name: next(getattr(models, name).parameters()).device.type for name in ("text_encoder", "unet", "vae")}


def test_offload_puts_only_the_stage_s_models_on_the_device():
    assert _placed("text", offload=True) == {"text_encoder": "meta", "unet": "cpu", "vae": "cpu"}
    assert _placed("denoise", offload=True) == {"text_encoder": "cpu", "unet": "meta", "vae": "cpu"}
    assert _placed("denoise", offload=True, vae_while_denoising=True) == {"text_encoder": "cpu", "unet": "meta", "vae": "meta"}
    assert _placed("decode", offload=True) == {"text_encoder": "cpu", "unet": "cpu", "vae": "meta"}
    assert _placed("decode", offload=False) == {"text_encoder": "meta", "unet": "meta", "vae": "meta"}


def test_an_unknown_memory_mode_is_one_sentence(tiny_model, tmp_path):
    with pytest.raises(BadRequest, match="^Unknown memory mode 'tiny'; choose one of auto, full, low.$"):
        check_request(_equirect(tiny_model, tmp_path / "x", memory="tiny"))
    result = run_cli("generate", "--prompt", "x", "--memory", "tiny", "--out", str(tmp_path / "y"))
    assert result.returncode == 2 and "--memory" in result.stderr and not (tmp_path / "y").exists()


def test_low_memory_turns_merged_attention_off_and_says_so(tiny_model, tmp_path, models):
    wide = dict(layout="wide", width=256, height=128, window=16, stride=8, views=None, memory="low")
    merged = run_job(check_request(_equirect(tiny_model, tmp_path / "mad", mad_steps=1, **wide)), models=models)
    plain = run_job(check_request(_equirect(tiny_model, tmp_path / "plain", **wide)), models=models)
    recorded = json.loads(open(merged["metadata"]).read())
    assert recorded["memory"]["mad_off"] is True and recorded["params"]["mad_steps"] == 1 and "mad" not in recorded
    assert open(merged["png"], "rb").read() == open(plain["png"], "rb").read()


def test_weights_still_to_place_are_all_of_them_on_the_cpu_and_the_offloaded_ones_on_a_gpu():
    models = ThreeModels()
    each = sum(parameter.numel() * parameter.element_size() for parameter in models.unet.parameters())
    assert memory.weights_to_place(models, torch.device("cpu")) == 3 * each
    models.unet.to("meta")  # the meta device plays the GPU: the UNet is there, the others were left in CPU memory
    assert memory.weights_to_place(models, torch.device("meta")) == 2 * each


# ------------------------------------------------------------------------------------- jobs too large to run
SD2_UNET = {"sample_size": 64, "block_out_channels": [320, 640, 1280, 1280]}
SD2_VAE = {"block_out_channels": [128, 256, 512, 512]}
GIB = 2**30


def sized(**fields) -> GenerateRequest:
    return GenerateRequest(prompt="x", device="cpu", out="/tmp/unused", **fields).validated()


def test_a_canvas_too_large_for_the_machine_is_refused_with_the_largest_size_that_fits():
    request = sized(layout="equirect", width=16384, height=8192)
    with pytest.raises(BadRequest) as refused:
        memory.check_job_fits(request, torch.device("cpu"), torch.float32, SD2_UNET, SD2_VAE,
                              weights_bytes=5 * GIB, free_host_bytes=16 * GIB)
    message = str(refused.value)
    assert message.startswith("A 16384x8192 px equirect job needs about") and "16.0 GiB free" in message
    width, height = (int(side) for side in message.split("fits is about ")[1].split(" px")[0].split("x"))
    assert width == 2 * height and width % 64 == 0 and 1024 <= width < 16384
    # The size it names fits; one step of 64 px larger would not.
    memory.check_job_fits(sized(layout="equirect", width=width, height=height), torch.device("cpu"), torch.float32,
                          SD2_UNET, SD2_VAE, weights_bytes=5 * GIB, free_host_bytes=16 * GIB)
    with pytest.raises(BadRequest):
        memory.check_job_fits(sized(layout="equirect", width=width + 128, height=height + 64), torch.device("cpu"),
                              torch.float32, SD2_UNET, SD2_VAE, weights_bytes=5 * GIB, free_host_bytes=16 * GIB)


def test_full_memory_on_the_cpu_is_told_to_use_low_when_only_low_fits():
    request = sized(layout="wide", width=2048, height=512, view_batch=64, memory="full")
    free = memory.HOST_BYTES_PER_IMAGE_PIXEL * 2048 * 512 + 3 * GIB
    with pytest.raises(BadRequest, match="pass --memory low"):
        memory.check_job_fits(request, torch.device("cpu"), torch.float32, SD2_UNET, SD2_VAE, 0, free_host_bytes=free)
    memory.check_job_fits(dataclasses.replace(request, memory="low"), torch.device("cpu"), torch.float32, SD2_UNET,
                          SD2_VAE, 0, free_host_bytes=free)


def test_a_gpu_job_whose_low_mode_activations_exceed_the_device_is_refused():
    request = sized(layout="equirect", width=4096, height=2048)
    arguments = (torch.device("cuda"), torch.float16, SD2_UNET, SD2_VAE, 5 * GIB)
    with pytest.raises(BadRequest, match="on the cuda device even with --memory low"):
        memory.check_job_fits(request, *arguments, free_host_bytes=64 * GIB, free_device_bytes=2**20)
    memory.check_job_fits(request, *arguments, free_host_bytes=64 * GIB, free_device_bytes=8 * GIB)


def test_the_cli_refuses_a_job_too_large_for_the_machine_before_loading(tiny_model, tmp_path, capsys, monkeypatch):
    # An 8 GiB machine: this one may have more, and a 16384x8192 job would then be allowed to run.
    monkeypatch.setattr(memory, "free_memory_bytes", lambda device: 8 * GIB)
    monkeypatch.setattr(ModelCache, "get", lambda *args: pytest.fail("the model was loaded"))
    from backend.app.cli import main

    code = main(["generate", "--prompt", "x", "--model", tiny_model, "--layout", "equirect", "--width", "16384",
                 "--height", "8192", "--device", "cpu", "--out", str(tmp_path / "out")])
    error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1 and "the largest equirect size that fits is about" in error
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------- plans per model family (issue 20)
# The real models' UNet and VAE configs (the fields the estimate reads) and their weights in float16 (parameter
# counts of stabilityai/stable-diffusion-xl-base-1.0 and stable-diffusion-2-base; SDXL's VAE kept in float32,
# as load_model keeps a VAE that asks for force_upcast).
SDXL_UNET = {"sample_size": 128, "block_out_channels": [320, 640, 1280]}
SDXL_WEIGHTS = {"text_encoder": 123_060_480 * 2, "text_encoder_2": 694_659_840 * 2, "unet": 2_567_463_684 * 2,
                "vae": 83_653_863 * 4}
SD2_WEIGHTS = {"text_encoder": 340_387_840 * 2, "unet": 865_910_724 * 2, "vae": 83_653_863 * 2}
CUDA_CONTEXT = GIB // 2  # what the CUDA runtime itself holds on a card


@pytest.fixture(scope="module")
def tiny_sdxl_folder(tmp_path_factory) -> str:
    from model_factory import save_random_sdxl_model

    return save_random_sdxl_model(str(tmp_path_factory.mktemp("models") / "tiny-sdxl"))


def card_plan(request: GenerateRequest, card_gib: float, unet_config: dict, weights: dict, vae_dtype=torch.float16,
              view_count: int = 40) -> memory.MemoryPlan:
    """The plan on a card of ``card_gib`` once an auto job has loaded the model onto it (all weights on it)."""
    free = int(card_gib * GIB) - CUDA_CONTEXT - sum(weights.values())
    return plan_memory(request, torch.device("cuda"), torch.float16, unet_config, SD2_VAE, view_count,
                       free_bytes=free, vae_dtype=vae_dtype, component_bytes=weights)


def world(width: int = 2048, **fields) -> GenerateRequest:
    return GenerateRequest(prompt="x", layout="equirect", width=width, height=width // 2, device="cuda",
                           out="/tmp/unused", **fields).validated()


@pytest.mark.parametrize("width", [2048, 4096])
def test_sdxl_on_an_8_gb_card_offloads_its_models_stage_by_stage(width):
    plan = card_plan(world(width), 8, SDXL_UNET, SDXL_WEIGHTS, vae_dtype=torch.float32)
    # Everything resident leaves half a GiB: not enough for a view; the UNet alone leaves room for one.
    assert (plan.mode, plan.offload, plan.view_batch) == ("offload", True, 1)
    assert plan.reason == "the job fits in the free memory with each stage's models alone on the device"
    assert plan.to_dict()["mode"] == "offload"
    # A 12 GB card: the denoising stage has room for a larger view batch.
    twelve = card_plan(world(2048), 12, SDXL_UNET, SDXL_WEIGHTS, vae_dtype=torch.float32)
    assert (twelve.mode, twelve.offload) == ("offload", True) and twelve.view_batch > 1
    # A 24 GB card keeps every model on the device; a 6 GB card cannot hold the UNet and a view: low.
    assert card_plan(world(2048), 24, SDXL_UNET, SDXL_WEIGHTS, vae_dtype=torch.float32).mode == "full"
    assert card_plan(world(2048), 6, SDXL_UNET, SDXL_WEIGHTS, vae_dtype=torch.float32).mode == "low"
    # Without the components' sizes (the CPU, or a caller that does not know them) there is no offload plan.
    free = 8 * GIB - CUDA_CONTEXT - sum(SDXL_WEIGHTS.values())
    assert plan_memory(world(2048), torch.device("cuda"), torch.float16, SDXL_UNET, SD2_VAE, 40, free_bytes=free,
                       vae_dtype=torch.float32).mode == "low"


def test_sd2_fits_an_8_gb_card_whole_and_a_4_gb_one_offloaded():
    assert card_plan(world(2048), 8, SD2_UNET, SD2_WEIGHTS).mode == "full"
    small = card_plan(world(2048), 4, SD2_UNET, SD2_WEIGHTS)
    assert (small.mode, small.offload) == ("offload", True)


def test_an_offload_plan_strips_the_decode_only_when_a_whole_tile_does_not_fit():
    request = world(2048)
    unet, decode = memory.estimate_activation_bytes(dataclasses.replace(request, view_batch=1), torch.float16,
                                                    SDXL_UNET, SD2_VAE, 40, torch.float32)
    weights = {"text_encoder": GIB // 4, "unet": GIB, "vae": GIB // 4}  # small models: the decode decides
    assert unet < decode

    def offload(available):
        return memory.plan_offload(request, torch.float16, SDXL_UNET, SD2_VAE, 40, weights, available, torch.float32)

    # Room for a whole tile beside the VAE; then only for a strip (about half a tile); then not even that.
    whole = weights["vae"] + int(decode / memory.HEADROOM) + 2**20
    assert (offload(whole).mode, offload(whole).strip_decode) == ("offload", False)
    assert offload(whole - 2**21).strip_decode is True
    assert offload(weights["vae"] + int(decode / 2 / memory.HEADROOM) - 2**20) is None


def test_an_offload_plan_retries_with_half_the_batch_then_low():
    request = world(2048)
    plan = card_plan(request, 12, SDXL_UNET, SDXL_WEIGHTS, vae_dtype=torch.float32)
    names = [name for name, _ in memory.memory_attempts(request, plan, torch.device("cuda"))]
    assert names == ["offload", "half view batch", "low"]


def test_a_job_whose_unet_and_one_view_do_not_fit_the_card_is_refused_with_the_estimate():
    request = sized(layout="equirect", width=2048, height=1024)
    arguments = (torch.device("cuda"), torch.float16, SDXL_UNET, SD2_VAE, 7 * GIB)
    with pytest.raises(BadRequest) as refused:
        memory.check_job_fits(request, *arguments, free_host_bytes=64 * GIB, free_device_bytes=5 * GIB,
                              largest_model_bytes=SDXL_WEIGHTS["unet"])
    message = str(refused.value)
    assert message == ("A 2048x1024 px job needs about 6.0 GiB on the cuda device even with --memory low (4.8 GiB "
                       "for the denoising model's weights and 1.2 GiB for one view), but it has 5.0 GiB free; lower --width and "
                       "--height or --window, use --device cpu, or free the device.")
    memory.check_job_fits(request, *arguments, free_host_bytes=64 * GIB, free_device_bytes=7 * GIB,
                          largest_model_bytes=SDXL_WEIGHTS["unet"])


def test_the_components_weights_are_read_from_the_headers(tiny_sdxl_folder):
    from backend.engine.models import ModelCache, component_weight_bytes, resolve_model_source

    source = resolve_model_source(tiny_sdxl_folder)
    sizes = component_weight_bytes(source, torch.float16)
    request = GenerateRequest(prompt="x", model=tiny_sdxl_folder, device="cpu", out="/tmp/unused")
    pipeline = ModelCache().get(check_request(request)).pipeline  # float32 on the CPU: twice the float16 bytes
    assert set(sizes) == {"text_encoder", "text_encoder_2", "unet", "vae"}
    assert {name: 2 * size for name, size in sizes.items()} == memory.component_bytes(pipeline)


def test_the_offload_plan_moves_the_text_encoders_off_the_device_after_encoding(tiny_sdxl_folder):
    # The real (tiny) SDXL pipeline; the meta device plays the GPU (models move onto it, not back), so each stage
    # starts from a fresh load. What runs on a GPU (the moves freeing its memory) needs the device check.
    from diffusers import StableDiffusionXLPipeline

    plan = card_plan(world(2048), 8, SDXL_UNET, SDXL_WEIGHTS, vae_dtype=torch.float32)
    where = {}
    for stage in ("text", "denoise", "decode"):
        pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_folder)
        StagePlacement(pipeline, torch.device("meta"), plan.offload).enter(stage)
        where[stage] = {name: next(module.parameters()).device.type
                        for name, module in memory.weighted_components(pipeline).items()}
    assert where["text"] == {"text_encoder": "meta", "text_encoder_2": "meta", "unet": "cpu", "vae": "cpu"}
    assert where["denoise"] == {"text_encoder": "cpu", "text_encoder_2": "cpu", "unet": "meta", "vae": "cpu"}
    assert where["decode"] == {"text_encoder": "cpu", "text_encoder_2": "cpu", "unet": "cpu", "vae": "meta"}


# SD3.5 medium's parts in float16 (parameter counts of stabilityai/stable-diffusion-3.5-medium, rounded): the
# transformer 2.47 B, CLIP-L 124 M, CLIP-G 695 M, the T5-XXL encoder 4.76 B, the VAE 84 M; its transformer's config.
SD3_WEIGHTS = {"text_encoder": 123_650_304 * 2, "text_encoder_2": 694_659_840 * 2, "text_encoder_3": 4_762_310_656 * 2,
               "transformer": 2_470_000_000 * 2, "vae": 83_819_683 * 2}
SD3_TRANSFORMER = {"sample_size": 128, "patch_size": 2, "num_attention_heads": 24, "attention_head_dim": 64}


def sd3_card_plan(card_gib: float, request: GenerateRequest | None = None) -> memory.MemoryPlan:
    """The auto plan of an SD3.5-medium world on a card of ``card_gib``, the model loaded as ``loads_on_device``
    decides: onto the card when every weight fits there, else into CPU memory."""
    from backend.engine.models import activation_config

    free = int(card_gib * GIB) - CUDA_CONTEXT
    total = sum(SD3_WEIGHTS.values())
    on_card = memory.loads_on_device("auto", torch.device("cuda"), total, free)
    return plan_memory(request or world(2048, window=128), torch.device("cuda"), torch.float16,
                       activation_config(SD3_TRANSFORMER), SD2_VAE, 40,
                       weights_bytes=0 if on_card else total, free_bytes=free - total if on_card else free,
                       component_bytes=SD3_WEIGHTS)


def test_sd3_on_an_8_gb_card_encodes_its_prompts_on_the_cpu_and_runs_its_transformer_on_the_card():
    # 16.3 GB of weights: loaded into CPU memory below 24 GB. The T5 encoder alone (9.5 GB) exceeds an 8 GB card.
    assert not memory.loads_on_device("auto", torch.device("cuda"), sum(SD3_WEIGHTS.values()), 8 * GIB)
    eight = sd3_card_plan(8)
    assert (eight.mode, eight.offload, eight.text_on_cpu) == ("offload", True, True)
    assert eight.to_dict()["text_on_cpu"] is True
    # 16 GB: the three text encoders fit alone on the card, then leave it; 24 GB holds everything.
    sixteen = sd3_card_plan(16)
    assert (sixteen.mode, sixteen.text_on_cpu) == ("offload", False)
    assert (sd3_card_plan(24).mode, sd3_card_plan(24).text_on_cpu) == ("full", False)
    # A low plan keeps the prompts on the CPU too, asked for or as the last attempt after running out of memory.
    assert sd3_card_plan(8, world(2048, window=128, memory="low")).text_on_cpu is True
    attempts = memory.memory_attempts(world(2048, window=128), eight, torch.device("cuda"))
    assert [name for name, _ in attempts][::len(attempts) - 1] == ["offload", "low"]
    assert all(plan.text_on_cpu for _, plan in attempts)
    # The CPU has nothing to keep apart; an SD2 model's text encoder fits a 4 GB card.
    assert not plan_memory(world(2048), torch.device("cpu"), torch.float32, SD2_UNET, SD2_VAE, 40,
                           free_bytes=64 * GIB, component_bytes=SD2_WEIGHTS).text_on_cpu
    assert not card_plan(world(2048), 4, SD2_UNET, SD2_WEIGHTS).text_on_cpu


def test_a_model_is_loaded_onto_a_gpu_only_when_its_weights_fit_there():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert memory.loads_on_device("auto", cuda, 7 * GIB, 10 * GIB)
    assert not memory.loads_on_device("auto", cuda, 9 * GIB, 10 * GIB)  # more than HEADROOM of the free memory
    assert not memory.loads_on_device("low", cuda, GIB, 10 * GIB)  # low always offloads
    assert memory.loads_on_device("full", cuda, GIB, None)  # unknown free memory: as asked
    assert memory.loads_on_device("low", cpu, 99 * GIB, GIB)  # the CPU is where models wait anyway


def test_text_on_the_cpu_keeps_the_text_encoders_off_the_device_in_every_stage():
    where = {}
    for stage in ("text", "denoise", "decode"):
        models = ThreeModels()  # the meta device plays the GPU
        placement = StagePlacement(models, torch.device("meta"), True, offload_device=torch.device("cpu"), text_on_cpu=True)
        placement.enter(stage)
        where[stage] = {name: next(getattr(models, name).parameters()).device.type for name in ("text_encoder", "unet", "vae")}
    assert placement.text_device == torch.device("cpu")
    assert where == {"text": {"text_encoder": "cpu", "unet": "cpu", "vae": "cpu"},
                     "denoise": {"text_encoder": "cpu", "unet": "meta", "vae": "cpu"},
                     "decode": {"text_encoder": "cpu", "unet": "cpu", "vae": "meta"}}
    # Without offload there is no text_on_cpu: every model stays on the device, the prompts are encoded there.
    assert StagePlacement(ThreeModels(), torch.device("meta"), False, text_on_cpu=True).text_device == torch.device("meta")


def test_sd3_large_on_an_8_gb_card_is_refused_before_it_loads():
    # 8.1 B transformer parameters: 16 GB in float16, more than the card even alone (no quantisation is built).
    from backend.engine.models import activation_config

    request = sized(layout="equirect", width=2048, height=1024, window=128)
    with pytest.raises(BadRequest) as refused:
        memory.check_job_fits(request, torch.device("cuda"), torch.float16, activation_config(SD3_TRANSFORMER),
                              SD2_VAE, 30 * GIB, free_host_bytes=64 * GIB, free_device_bytes=7 * GIB,
                              largest_model_bytes=8_100_000_000 * 2)
    assert "on the cuda device even with --memory low (15.1 GiB for the denoising model's weights" in str(refused.value)
    assert len(str(refused.value).splitlines()) == 1
