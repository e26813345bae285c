"""Write a diffusers Stable Diffusion folder as an original (CompVis LDM) single-file checkpoint.

Users often have their models as one ``.safetensors`` file in the original Stable Diffusion layout
(``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.transformer.*``) rather than as a
diffusers folder. Tests use this module to make such a file from the random models of ``model_factory``.

The key mapping is the inverse of diffusers' own LDM -> diffusers conversion
(``diffusers/loaders/single_file_utils.py``: ``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``,
``convert_ldm_clip_checkpoint``), so ``StableDiffusionPipeline.from_single_file(path, config=folder)`` gives
back exactly the weights of ``folder``. It covers the SD1/SD2 UNet and VAE layouts; the text encoder is written
in the Hugging Face CLIP layout that SD1 checkpoints use (diffusers also reads an SD2-sized CLIP from it, but it
is not the OpenCLIP layout of the original SD2 files). An SDXL folder (one with ``text_encoder_2``) is written
as SDXL's original (Stability's generative-models) checkpoints are: the UNet's added embedding as
``label_emb``, the first text encoder in the CLIP layout under ``conditioner.embedders.0.transformer.``, the
second in the OpenCLIP layout under ``conditioner.embedders.1.model.`` (fused q/k/v ``in_proj`` weights, the
projection transposed), the inverse of diffusers' ``convert_open_clip_checkpoint``. Anything this mapping does not know raises ``KeyError``
rather than being dropped, so a written file is always complete.
"""

from __future__ import annotations

import os

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextModel

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."
SDXL_TEXT_ENCODER_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

# Modules whose names differ only at the top level (diffusers name -> LDM name).
UNET_TOP_LEVEL = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL's pooled text + time ids embedding
    "add_embedding.linear_2": "label_emb.0.2",
}
VAE_TOP_LEVEL = {
    "encoder.conv_in": "encoder.conv_in",
    "encoder.conv_out": "encoder.conv_out",
    "encoder.conv_norm_out": "encoder.norm_out",
    "decoder.conv_in": "decoder.conv_in",
    "decoder.conv_out": "decoder.conv_out",
    "decoder.conv_norm_out": "decoder.norm_out",
    "quant_conv": "quant_conv",
    "post_quant_conv": "post_quant_conv",
}

# Renames of the layers inside one block (diffusers name -> LDM name). The UNet's transformer blocks
# (``attentions.N``) use the same names in both layouts, so they need none.
UNET_RESNET_LAYERS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
VAE_RESNET_LAYERS = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION_LAYERS = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}
# The LDM VAE attention projects with 1x1 convolutions; diffusers uses linear layers and drops the two
# trailing 1-sized dimensions when loading, so they are added back here.
VAE_CONV_ATTENTION_LAYERS = ("q", "k", "v", "proj_out")


def _unet_blocks(config) -> dict[str, tuple[str, dict[str, str]]]:
    """Map each diffusers UNet block prefix to its LDM prefix and the layer renames inside it.

    LDM numbers the down path as one flat list (``input_blocks``, conv_in being 0) of resnet(+attention)
    pairs with a downsampler after every level but the last; the up path likewise (``output_blocks``), with
    one more resnet per level and the upsampler appended to the level's last entry.
    """
    layers_per_block = config.layers_per_block
    if not isinstance(layers_per_block, int):
        raise NotImplementedError("per-level layers_per_block (SDXL-style configs) is not supported")

    blocks: dict[str, tuple[str, dict[str, str]]] = {}
    index = 1
    for level in range(len(config.down_block_types)):
        for layer in range(layers_per_block):
            blocks[f"down_blocks.{level}.resnets.{layer}."] = (f"input_blocks.{index}.0.", UNET_RESNET_LAYERS)
            blocks[f"down_blocks.{level}.attentions.{layer}."] = (f"input_blocks.{index}.1.", {})
            index += 1
        if level != len(config.down_block_types) - 1:
            blocks[f"down_blocks.{level}.downsamplers.0.conv."] = (f"input_blocks.{index}.0.op.", {})
            index += 1

    blocks["mid_block.resnets.0."] = ("middle_block.0.", UNET_RESNET_LAYERS)
    blocks["mid_block.attentions.0."] = ("middle_block.1.", {})
    blocks["mid_block.resnets.1."] = ("middle_block.2.", UNET_RESNET_LAYERS)

    index = 0
    for level, block_type in enumerate(config.up_block_types):
        for layer in range(layers_per_block + 1):
            blocks[f"up_blocks.{level}.resnets.{layer}."] = (f"output_blocks.{index}.0.", UNET_RESNET_LAYERS)
            blocks[f"up_blocks.{level}.attentions.{layer}."] = (f"output_blocks.{index}.1.", {})
            index += 1
        # The upsampler follows the last resnet, or the last resnet and its attention.
        upsampler_slot = 2 if "CrossAttn" in block_type else 1
        blocks[f"up_blocks.{level}.upsamplers.0.conv."] = (f"output_blocks.{index - 1}.{upsampler_slot}.conv.", {})
    return blocks


def _vae_blocks(config) -> dict[str, tuple[str, dict[str, str]]]:
    """Map each diffusers VAE block prefix to its LDM prefix and the layer renames inside it.

    LDM numbers the decoder's levels from the lowest resolution up, so diffusers' up block ``i`` is LDM's
    ``up.{levels - 1 - i}``. Decoder levels have one resnet more than encoder levels.
    """
    layers_per_block = config.layers_per_block
    blocks: dict[str, tuple[str, dict[str, str]]] = {}
    for level in range(len(config.down_block_types)):
        for layer in range(layers_per_block):
            blocks[f"encoder.down_blocks.{level}.resnets.{layer}."] = (
                f"encoder.down.{level}.block.{layer}.",
                VAE_RESNET_LAYERS,
            )
        blocks[f"encoder.down_blocks.{level}.downsamplers.0.conv."] = (f"encoder.down.{level}.downsample.conv.", {})
    levels = len(config.up_block_types)
    for level in range(levels):
        ldm_level = levels - 1 - level
        for layer in range(layers_per_block + 1):
            blocks[f"decoder.up_blocks.{level}.resnets.{layer}."] = (
                f"decoder.up.{ldm_level}.block.{layer}.",
                VAE_RESNET_LAYERS,
            )
        blocks[f"decoder.up_blocks.{level}.upsamplers.0.conv."] = (f"decoder.up.{ldm_level}.upsample.conv.", {})
    for part in ("encoder", "decoder"):
        for resnet in range(2):
            blocks[f"{part}.mid_block.resnets.{resnet}."] = (f"{part}.mid.block_{resnet + 1}.", VAE_RESNET_LAYERS)
        blocks[f"{part}.mid_block.attentions.0."] = (f"{part}.mid.attn_1.", VAE_ATTENTION_LAYERS)
    return blocks


def _ldm_name(key: str, top_level: dict[str, str], blocks: dict[str, tuple[str, dict[str, str]]]) -> str:
    """Return the LDM name of diffusers parameter ``key``; raise KeyError when the mapping does not cover it."""
    module, _, parameter = key.rpartition(".")
    if module in top_level:
        return f"{top_level[module]}.{parameter}"
    for prefix, (ldm_prefix, layer_renames) in blocks.items():
        if key.startswith(prefix):
            rest = key[len(prefix):]
            # Only the layer name right after the block prefix is renamed, never a deeper one.
            for old, new in layer_renames.items():
                if rest.startswith(old + "."):
                    rest = new + rest[len(old):]
                    break
            return ldm_prefix + rest
    raise KeyError(f"no LDM name known for diffusers parameter {key!r}")


def _unet_tensors(unet: UNet2DConditionModel) -> list[tuple[str, torch.Tensor]]:
    blocks = _unet_blocks(unet.config)
    return [(UNET_PREFIX + _ldm_name(key, UNET_TOP_LEVEL, blocks), value) for key, value in unet.state_dict().items()]


def _vae_tensors(vae: AutoencoderKL) -> list[tuple[str, torch.Tensor]]:
    blocks = _vae_blocks(vae.config)
    tensors = []
    for key, value in vae.state_dict().items():
        name = _ldm_name(key, VAE_TOP_LEVEL, blocks)
        layer = name.rsplit(".", 2)[-2]
        if ".mid.attn_1." in name and layer in VAE_CONV_ATTENTION_LAYERS and name.endswith(".weight"):
            value = value[:, :, None, None]  # linear (out, in) -> 1x1 conv (out, in, 1, 1)
        tensors.append((VAE_PREFIX + name, value))
    return tensors


def _text_encoder_tensors(text_encoder: CLIPTextModel, prefix: str = TEXT_ENCODER_PREFIX) -> list[tuple[str, torch.Tensor]]:
    # Recent transformers flatten CLIPTextModel (no ``text_model.`` level); the SD1 layout has it, and
    # diffusers strips it again when its model is flat.
    return [
        (prefix + (key if key.startswith("text_model.") else "text_model." + key), value)
        for key, value in text_encoder.state_dict().items()
    ]


# OpenCLIP's names of a transformer layer's parts (diffusers/transformers name -> OpenCLIP name).
OPEN_CLIP_LAYERS = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
OPEN_CLIP_TOP_LEVEL = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}


def _open_clip_tensors(text_encoder, prefix: str = SDXL_OPEN_CLIP_PREFIX) -> list[tuple[str, torch.Tensor]]:
    """A ``CLIPTextModelWithProjection`` in OpenCLIP's layout (SDXL's second text encoder): q, k and v fused into
    ``attn.in_proj_weight``/``in_proj_bias`` (in that order), ``text_projection`` stored (in, out). Raises
    KeyError for a parameter this mapping does not cover."""
    state = text_encoder.state_dict()
    tensors, layers = [], set()
    for key, value in state.items():
        if key in OPEN_CLIP_TOP_LEVEL:
            tensors.append((prefix + OPEN_CLIP_TOP_LEVEL[key], value))
        elif key == "text_projection.weight":
            tensors.append((prefix + "text_projection", value.T))
        elif key.startswith("text_model.encoder.layers."):
            index, _, rest = key[len("text_model.encoder.layers."):].partition(".")
            layer = f"{prefix}transformer.resblocks.{index}."
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                layers.add(index)  # fused below
                continue
            part, _, parameter = rest.rpartition(".")
            if part not in OPEN_CLIP_LAYERS:
                raise KeyError(f"no OpenCLIP name known for text encoder parameter {key!r}")
            tensors.append((layer + OPEN_CLIP_LAYERS[part] + "." + parameter, value))
        else:
            raise KeyError(f"no OpenCLIP name known for text encoder parameter {key!r}")
    for index in sorted(layers, key=int):
        attention = f"text_model.encoder.layers.{index}.self_attn."
        for parameter in ("weight", "bias"):
            fused = torch.cat([state[f"{attention}{name}_proj.{parameter}"] for name in ("q", "k", "v")])
            tensors.append((f"{prefix}transformer.resblocks.{index}.attn.in_proj_{parameter}", fused))
    return tensors


def write_ldm_single_file(diffusers_folder: str, out_path: str) -> str:
    """Convert the unet, vae and text encoder(s) of diffusers folder ``diffusers_folder`` (SD, or SDXL with its
    second text encoder) into one original-layout checkpoint.

    Writes a safetensors file at ``out_path`` (tensors keep their dtype; the scheduler and tokenizer are not
    stored, as in the original checkpoints: load it with ``config=diffusers_folder``) and returns ``out_path``.
    Raises ``KeyError`` for a parameter the LDM mapping does not cover.
    """
    from transformers import CLIPTextModelWithProjection

    unet = UNet2DConditionModel.from_pretrained(diffusers_folder, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(diffusers_folder, subfolder="vae")
    text_encoder = CLIPTextModel.from_pretrained(os.path.join(diffusers_folder, "text_encoder"))
    second = os.path.join(diffusers_folder, "text_encoder_2")
    if os.path.isdir(second):
        text = (_text_encoder_tensors(text_encoder, SDXL_TEXT_ENCODER_PREFIX)
                + _open_clip_tensors(CLIPTextModelWithProjection.from_pretrained(second)))
    else:
        text = _text_encoder_tensors(text_encoder)

    checkpoint: dict[str, torch.Tensor] = {}
    for name, value in _unet_tensors(unet) + _vae_tensors(vae) + text:
        # A clash would silently drop a weight, so it is an error.
        if name in checkpoint:
            raise ValueError(f"two parameters map to the LDM name {name!r}")
        # safetensors wants contiguous tensors that do not share storage.
        checkpoint[name] = value.detach().contiguous().clone()
    save_file(checkpoint, out_path)
    return out_path
