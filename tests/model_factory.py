"""Build Stable-Diffusion-architecture models with random weights and save them as diffusers folders.

Tests use the tiny configs below (seconds on a CPU); the benchmarks pass full-size configs (real timings,
random weights). Models are written with ``save_pretrained`` so the engine loads them the way it loads a
user's model. No network: the tokenizer's vocabulary is written here.
"""

from __future__ import annotations

import json
import os
import tempfile

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

# A UNet trained (were it trained) on 32x32 latents; tests pass --window to pick other sizes.
TINY_UNET = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    block_out_channels=(4, 8),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32,
    norm_num_groups=2,
)
# Four resolution levels: a VAE factor of 8, as Stable Diffusion's (diffusers' panorama pipeline assumes 8).
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(4, 4, 4, 4),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1,
    norm_num_groups=2,
    sample_size=64,
)
TINY_TEXT = dict(
    hidden_size=32,
    intermediate_size=37,
    num_attention_heads=4,
    num_hidden_layers=2,
    layer_norm_eps=1e-5,
    vocab_size=1000,
)
SD_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


def write_clip_tokenizer(folder: str, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """Write a character-level CLIP BPE vocabulary (no merges) into ``folder`` and load it.

    Returns the tokenizer; its ids 0/1 are the start/end tokens, which the text config below uses. ``pad_token``:
    what pads a prompt to 77 tokens (SD's tokenizer pads with the end token; SDXL's second pads with "!", id 2).
    """
    os.makedirs(folder, exist_ok=True)
    byte_chars = [chr(c) for c in range(33, 127)] + [chr(c) for c in range(161, 256)]
    tokens = ["<|startoftext|>", "<|endoftext|>"] + byte_chars + [c + "</w>" for c in byte_chars]
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({token: index for index, token in enumerate(tokens)}, f)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
    return CLIPTokenizer(
        os.path.join(folder, "vocab.json"),
        os.path.join(folder, "merges.txt"),
        model_max_length=77,
        pad_token=pad_token,
    )


def save_random_sd_model(
    folder: str,
    unet_config: dict = TINY_UNET,
    vae_config: dict = TINY_VAE,
    text_config: dict = TINY_TEXT,
    seed: int = 0,
    scheduler=None,
    dtype: torch.dtype = torch.float32,
) -> str:
    """Build a Stable Diffusion pipeline with random weights (repeatable for ``seed``) and save it.

    Returns ``folder``, a diffusers folder with safetensors weights in ``dtype`` (float16 halves a full-size
    model's files) and ``scheduler`` (default: DDIM with Stable Diffusion's betas). A UNet config with
    ``time_cond_proj_dim`` and an ``LCMScheduler`` make a guidance-distilled Latent Consistency Model's
    architecture.
    """
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**vae_config)
    with tempfile.TemporaryDirectory() as vocab_folder:
        tokenizer = write_clip_tokenizer(vocab_folder)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, **text_config)
    )
    pipeline = StableDiffusionPipeline(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        scheduler=scheduler if scheduler is not None else DDIMScheduler(**SD_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.to(dtype).save_pretrained(folder, safe_serialization=True)
    return folder


# A tiny AutoencoderTiny (TAESD architecture: 4 decoder stages, 8x upsampling, 4 latent channels).
TINY_TAESD = dict(
    encoder_block_out_channels=(8, 8, 8, 8),
    decoder_block_out_channels=(8, 8, 8, 8),
    num_encoder_blocks=(1, 1, 1, 1),
    num_decoder_blocks=(1, 1, 1, 1),
    latent_channels=4,
)


def save_random_tiny_autoencoder(folder: str, config: dict = TINY_TAESD, seed: int = 3) -> str:
    """Build a diffusers AutoencoderTiny with random weights (repeatable for ``seed``), save it as
    safetensors into ``folder`` and return ``folder`` (what ``--sync-decoder FOLDER`` loads)."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    AutoencoderTiny(**config).eval().save_pretrained(folder, safe_serialization=True)
    return folder


def save_random_lora(folder: str, model_folder: str, rank: int = 4, seed: int = 4, text_encoders: bool = False) -> str:
    """Build LoRA weights with random (non-zero) values for the UNet attention projections of the model in
    ``model_folder`` (SD or SDXL: saved by its own pipeline class) and, with ``text_encoders``, for the attention
    projections of each of its text encoders (SDXL's two), and save them as diffusers'
    ``pytorch_lora_weights.safetensors`` into ``folder``; returns ``folder`` (what ``--lora FOLDER`` loads)."""
    import diffusers
    import transformers
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    with open(os.path.join(model_folder, "model_index.json"), encoding="utf-8") as f:
        model_index = json.load(f)
    pipeline_class = getattr(diffusers, model_index["_class_name"])
    unet = UNet2DConditionModel.from_pretrained(model_folder, subfolder="unet")
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    layers = {"unet_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))}
    for name in ("text_encoder", "text_encoder_2") if text_encoders else ():
        if name not in model_index:
            continue
        encoder_class = getattr(transformers, model_index[name][1])
        encoder = encoder_class.from_pretrained(model_folder, subfolder=name)
        encoder.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                                       target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
        layers[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(encoder))
    pipeline_class.save_lora_weights(folder, **layers, safe_serialization=True)
    return folder


# SDXL's architecture in miniature: the UNet takes the pooled text embedding of the second text encoder and six
# time ids (original size, crop, target size) through its "text_time" added embedding, as SDXL's does; the two
# text encoders' penultimate states are concatenated (32 + 48 = cross_attention_dim 80). The encoders differ in
# width, as SDXL's do (768 and 1280), which is how diffusers' single-file loader tells them apart.
TINY_SDXL_TEXT_2 = dict(TINY_TEXT, hidden_size=48)
TINY_SDXL_POOLED = 32  # the second encoder's projection_dim: the pooled embedding's width
TINY_SDXL_UNET = dict(
    TINY_UNET,
    sample_size=16,
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    transformer_layers_per_block=(1, 2),
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + TINY_SDXL_POOLED,  # six time ids of 8 + the pooled embedding
    cross_attention_dim=TINY_TEXT["hidden_size"] + TINY_SDXL_TEXT_2["hidden_size"],
)
TINY_SDXL_VAE = dict(TINY_VAE, scaling_factor=0.13025, force_upcast=True)  # SDXL's latent scale
SDXL_SCHEDULER = dict(SD_SCHEDULER, timestep_spacing="leading")


def save_random_sdxl_model(
    folder: str,
    unet_config: dict = TINY_SDXL_UNET,
    vae_config: dict = TINY_SDXL_VAE,
    text_config: dict = TINY_TEXT,
    text_2_config: dict = TINY_SDXL_TEXT_2,
    pooled_width: int = TINY_SDXL_POOLED,
    seed: int = 0,
    scheduler=None,
    dtype: torch.dtype = torch.float32,
    force_zeros_for_empty_prompt: bool = True,
) -> str:
    """Build a Stable Diffusion XL pipeline with random weights (repeatable for ``seed``) and save it.

    Returns ``folder``, a diffusers ``StableDiffusionXLPipeline`` folder with safetensors weights in ``dtype``:
    a ``CLIPTextModel`` (``text_config``) and a ``CLIPTextModelWithProjection`` (``text_2_config``; the UNet's
    ``cross_attention_dim`` is the sum of their widths; its ``projection_dim`` is ``pooled_width``, which with six
    time ids makes the UNet's ``projection_class_embeddings_input_dim`` in an SDXL base), two tokenizers (the
    second padding with "!" as SDXL's does), and ``scheduler`` (default: DDIM with SDXL's betas).
    ``force_zeros_for_empty_prompt``: the pipeline config that makes "no negative prompt" zero embeddings.
    """
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**vae_config)
    with tempfile.TemporaryDirectory() as vocab_folder:
        tokenizer = write_clip_tokenizer(vocab_folder)
    with tempfile.TemporaryDirectory() as vocab_folder:
        tokenizer_2 = write_clip_tokenizer(vocab_folder, pad_token="!")
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, **text_config))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=2, projection_dim=pooled_width, **text_2_config))
    pipeline = StableDiffusionXLPipeline(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler=scheduler if scheduler is not None else DDIMScheduler(**SDXL_SCHEDULER),
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
        add_watermarker=False,
    )
    pipeline.to(dtype).save_pretrained(folder, safe_serialization=True)
    return folder


# Stable Diffusion 3's architecture in miniature: an MMDiT (``SD3Transformer2DModel``) on 16-channel latents in
# 2x2 patches, whose positional embeddings are a centred crop of a larger grid (``pos_embed_max_size`` 16 patches
# for a 16-latent window of 8), conditioned on two CLIP encoders with projections (CLIP-L 32 wide and CLIP-G 48:
# their penultimate states concatenated, 80, zero-padded to the joint width 96; their pooled projections
# concatenated, 16 + 16 = 32) and, where asked for, T5 (``TINY_T5``, as wide as the joint width; else absent,
# ``text_encoder_3=None`` as diffusers allows, and the pipeline fills T5's place with zeros); a 16-channel VAE with SD3's scale and shift; the flow-matching Euler
# sampler with SD3's shift 3.
TINY_SD3_POOLED = 16  # each CLIP encoder's projection_dim
TINY_SD3_TEXT_2 = dict(TINY_TEXT, hidden_size=48)
TINY_SD3_TRANSFORMER = dict(
    sample_size=16,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=96,
    caption_projection_dim=16,
    pooled_projection_dim=2 * TINY_SD3_POOLED,
    pos_embed_max_size=16,
)
TINY_SD3_VAE = dict(TINY_VAE, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                    use_post_quant_conv=False)
SD3_SCHEDULER = dict(shift=3.0)
TINY_T5 = dict(d_model=96, d_ff=37, d_kv=8, num_layers=1, num_heads=2, vocab_size=200)


def write_t5_tokenizer(folder: str):
    """Write a character-level Unigram tokenizer in T5's form (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, SentencePiece's
    "▁" word marker, ``</s>`` appended) as a ``tokenizer.json`` into ``folder`` and load it as ``T5TokenizerFast``:
    T5's own vocabulary needs sentencepiece and the network. 192 tokens (``TINY_T5``'s vocabulary holds them)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    chars = [chr(c) for c in range(33, 127)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    vocab += [(c, -2.0) for c in chars] + [("\u2581" + c, -1.5) for c in chars]
    model = Tokenizer(models.Unigram(vocab, unk_id=2))
    model.pre_tokenizer = pre_tokenizers.Metaspace()
    model.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = T5TokenizerFast(tokenizer_object=model, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                extra_ids=0)
    tokenizer.save_pretrained(folder)
    return T5TokenizerFast.from_pretrained(folder)


def save_random_sd3_model(
    folder: str,
    transformer_config: dict = TINY_SD3_TRANSFORMER,
    vae_config: dict = TINY_SD3_VAE,
    text_config: dict = TINY_TEXT,
    text_2_config: dict = TINY_SD3_TEXT_2,
    pooled_width: int = TINY_SD3_POOLED,
    seed: int = 0,
    scheduler=None,
    dtype: torch.dtype = torch.float32,
    t5_config: dict | None = None,
) -> str:
    """Build a Stable Diffusion 3 pipeline with random weights (repeatable for ``seed``) and save it.

    Returns ``folder``, a diffusers ``StableDiffusion3Pipeline`` folder with safetensors weights in ``dtype``: an
    ``SD3Transformer2DModel`` (``transformer_config``), two ``CLIPTextModelWithProjection`` (``text_config``,
    ``text_2_config``, each projecting to ``pooled_width``; the transformer's ``pooled_projection_dim`` is twice
    that and its ``joint_attention_dim`` at least their summed widths), a ``T5EncoderModel`` of ``t5_config``
    (``d_model`` the joint width; ``TINY_T5``) with ``write_t5_tokenizer``'s tokenizer, or with None no T5
    (``text_encoder_3`` and ``tokenizer_3`` None), two CLIP tokenizers (the second padding with "!" as SD3's CLIP-G does), a 16-channel VAE
    and ``scheduler`` (default: ``FlowMatchEulerDiscreteScheduler`` with SD3's shift of 3).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**transformer_config)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**vae_config)
    with tempfile.TemporaryDirectory() as vocab_folder:
        tokenizer = write_clip_tokenizer(vocab_folder)
    with tempfile.TemporaryDirectory() as vocab_folder:
        tokenizer_2 = write_clip_tokenizer(vocab_folder, pad_token="!")
    encoders = []
    for offset, config in ((2, text_config), (3, text_2_config)):
        torch.manual_seed(seed + offset)
        encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(
            bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=pooled_width, **config)).eval())
    text_encoder_3 = tokenizer_3 = None
    if t5_config is not None:
        from transformers import T5Config, T5EncoderModel

        with tempfile.TemporaryDirectory() as vocab_folder:
            tokenizer_3 = write_t5_tokenizer(vocab_folder)
        torch.manual_seed(seed + 4)
        text_encoder_3 = T5EncoderModel(T5Config(pad_token_id=0, eos_token_id=1, **t5_config)).eval()
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer.eval(),
        vae=vae.eval(),
        text_encoder=encoders[0],
        text_encoder_2=encoders[1],
        text_encoder_3=text_encoder_3,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        tokenizer_3=tokenizer_3,
        scheduler=scheduler if scheduler is not None else FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER),
    )
    pipeline.to(dtype).save_pretrained(folder, safe_serialization=True)
    return folder
