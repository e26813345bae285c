"""Finding, describing and loading Stable Diffusion models; picking the device and dtype.

A model is given as a hub id (``stabilityai/stable-diffusion-2-base``), a local diffusers folder, or a
single-file ``.safetensors`` checkpoint. Pickled checkpoints (``.ckpt``, ``.bin``, ``.pt``, ``.pth``) can
run arbitrary code when loaded and are refused unless the user passes ``--allow-pickle``.

The geometry the engine needs (VAE factor, latent channels, UNet sample size) is read from the model's
config files before any weights load, so bad sizes are rejected quickly.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch

from ..errors import BadRequest, ModelNotFound
from .model_manager import (
    HOW_TO_POINT_LOCALLY,
    HUB_ID,
    PICKLE_SUFFIXES,
    WEIGHTED_COMPONENTS,
    architecture_from_configs,
    cached_snapshot,
    check_folder_weights,
    check_model_folder,
    check_safetensors_file,
    denoiser_component,
    hub_offline,
    read_safetensors_header,
    single_file_architecture,
)
from ..request import ModelGeometry


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from. kind: 'hub' (location is a repo id), 'folder' or 'single_file'."""

    kind: str
    location: str


@dataclass
class LoadedModel:
    """A loaded diffusers pipeline plus what the engine reads from it. architecture: "SDXL" for a
    ``StableDiffusionXLPipeline`` (two text encoders, pooled embeddings and time ids), "SD3" for a
    ``StableDiffusion3Pipeline`` (a flow-matching transformer, ``denoising_model``), else "SD1", "SD2" or None
    (a ``StableDiffusionPipeline`` whose configs do not say which). compiled_unet: the pipeline's UNet
    under torch.compile once a ``--compile`` job asked for it (``compiled_unet``), kept with the model so that
    the worker's ``ModelCache`` serves it to later jobs; None until then."""

    pipeline: object  # diffusers.StableDiffusionPipeline, StableDiffusionXLPipeline or StableDiffusion3Pipeline
    geometry: ModelGeometry
    source: ModelSource
    device: torch.device
    dtype: torch.dtype
    architecture: str | None = None
    compiled_unet: object | None = None


def denoising_model(pipeline) -> torch.nn.Module:
    """The network a pipeline denoises with: its UNet, or an SD3 pipeline's transformer."""
    transformer = getattr(pipeline, "transformer", None)
    return transformer if transformer is not None else pipeline.unet


DIT_ACTIVATION_WIDTH_PER_HIDDEN = 3 / 64
"""A transformer's activation memory in ``memory.estimate_full_bytes``' unit (a UNet's first-block channels, 64
elements per latent pixel and channel): one block at a time holds about 12 hidden-wide values per token (norms,
q/k/v, attention output, the 4x MLP), a token covers 2x2 latents, so 3 hidden widths per latent pixel. Not measured."""


def activation_config(config) -> dict:
    """The config ``memory``'s estimates read (``sample_size`` and ``block_out_channels``) of a denoising model with
    ``config`` (dict or diffusers config): a UNet's own; for a transformer, its ``sample_size`` and one equivalent
    width, ``DIT_ACTIVATION_WIDTH_PER_HIDDEN`` of its hidden width (heads × head width), at least 1."""
    if "block_out_channels" in config:
        return config
    hidden = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    return {"sample_size": config["sample_size"],
            "block_out_channels": [max(1, round(hidden * DIT_ACTIVATION_WIDTH_PER_HIDDEN))]}


def weighted_components(pipeline) -> dict[str, torch.nn.Module]:
    """{name: module} of the pipeline's components with weights that a job runs: the ``WEIGHTED_COMPONENTS`` it
    has (SDXL's ``text_encoder_2`` only where there is one), in that order."""
    modules = {name: getattr(pipeline, name, None) for name in WEIGHTED_COMPONENTS}
    return {name: module for name, module in modules.items() if module is not None}


CHANNELS_LAST_DEVICES = ("cuda",)
"""Device types whose UNet and VAE weights are stored channels_last (``use_channels_last``): cuDNN runs the
convolutions of half-precision NHWC tensors on tensor cores without layout transposes. Not on the CPU or MPS,
where it was not measured to pay."""


def use_channels_last(*modules: torch.nn.Module) -> None:
    """Store the 4-D weights (convolutions) of ``modules`` in channels_last memory format, in place. The values
    and every output stay the same; later ``.to(device)`` moves keep the format (they preserve strides)."""
    for module in modules:
        module.to(memory_format=torch.channels_last)


def compiled_unet(model: LoadedModel):
    """``model``'s UNet under ``torch.compile`` (the default mode: Inductor kernels, no CUDA graphs, so the
    weights may still move between devices), made on the first call and kept on the model: the worker's
    ``ModelCache`` keeps the model, so only the first ``--compile`` job with it pays for compiling (which
    happens lazily, during that job's first UNet calls). The compiled module shares the UNet's weights."""
    if model.compiled_unet is None:
        model.compiled_unet = torch.compile(denoising_model(model.pipeline))
    return model.compiled_unet


def resolve_model_source(spec: str, allow_pickle: bool = False) -> ModelSource:
    """Decide whether ``spec`` is a local folder, a single-file checkpoint or a hub id.

    Local models are checked before anything loads, reading only listings, configs and safetensors headers:
    a folder must be a diffusers model with loadable weights (``check_folder_weights``), a ``.safetensors``
    file must have a sound header (``check_safetensors_file``). Raises BadRequest for an unreadable,
    truncated or weightless model, pickled weights without ``allow_pickle``, or a string that is neither an
    existing path nor a valid hub id.
    """
    path = os.path.abspath(os.path.expanduser(spec))
    looks_like_path = spec.startswith(("/", ".", "~")) or spec.lower().endswith(PICKLE_SUFFIXES + (".safetensors",))
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise BadRequest(f"The folder {path} is not a diffusers model (it has no model_index.json).")
        if not os.access(os.path.join(path, "model_index.json"), os.R_OK):
            raise BadRequest(f"The model folder {path} cannot be read.")
        check_folder_weights(path, allow_pickle)
        return ModelSource("folder", path)
    if os.path.exists(path):
        if not os.access(path, os.R_OK):
            raise BadRequest(f"The model file {path} cannot be read.")
        if path.lower().endswith(".safetensors"):
            check_safetensors_file(path, "checkpoint")
            return ModelSource("single_file", path)
        if path.lower().endswith(PICKLE_SUFFIXES):
            if not allow_pickle:
                raise BadRequest(
                    f"{os.path.basename(path)} is a pickled checkpoint, which can run code when loaded; "
                    "use a .safetensors file or pass --allow-pickle if you trust its source."
                )
            return ModelSource("single_file", path)
        raise BadRequest(f"The model file {path} is neither .safetensors nor a known checkpoint format.")
    if looks_like_path or not HUB_ID.match(spec):
        raise BadRequest(f"The model path {path} does not exist.")
    return ModelSource("hub", spec)


def read_model_geometry(source: ModelSource, unet_config: dict | None = None) -> ModelGeometry | None:
    """Read VAE factor, latent channels and UNet sample size from the model's config files (``unet_config``:
    the UNet's config when the caller has read it already, ``read_unet_config``).

    Returns None for single-file checkpoints, whose configs diffusers only derives while loading.
    Raises ModelNotFound when a hub model is neither cached nor downloadable.
    """
    if source.kind == "single_file":
        return None
    return geometry_from_configs(read_vae_config(source), unet_config or read_unet_config(source))


def local_weights_variant(source: ModelSource) -> str | None:
    """``fp16`` when the local folder, or the cached snapshot of a hub model, holds some component's weights
    only as the fp16 variant (``python -m backend models download --fp16``), so diffusers must load it with
    ``variant="fp16"`` (taking the plain weights of the others); else None."""
    folder = local_folder(source)
    return check_model_folder(folder).variant if folder else None


def local_folder(source: ModelSource) -> str | None:
    """The folder on this machine that holds ``source``'s diffusers files: a local folder itself, a hub model's
    snapshot in the Hugging Face cache (however much was fetched); None for a single file or an uncached model."""
    if source.kind == "folder":
        return source.location
    return cached_snapshot(source.location) if source.kind == "hub" else None


def read_unet_config(source: ModelSource) -> dict | None:
    """The UNet's config (a dict; an SD3 model's transformer's, ``model_manager.denoiser_component``) of a
    diffusers folder or hub model, None for a single-file checkpoint (``read_model_geometry``'s rule). Raises
    ModelNotFound as it does."""
    if source.kind == "single_file":
        return None
    return _read_config(source, f"{denoiser_component(_read_config(source, 'model_index.json'))}/config.json")


def read_vae_config(source: ModelSource) -> dict | None:
    """The VAE's config (a dict) of a diffusers folder or hub model, None for a single-file checkpoint
    (``read_model_geometry``'s rule). Raises ModelNotFound as it does."""
    if source.kind == "single_file":
        return None
    return _read_config(source, "vae/config.json")


def weights_file_bytes(source: ModelSource) -> int:
    """Bytes of the weight files a job loads from ``source`` (the text encoder, UNet and VAE of a local folder or
    of a hub model's cached snapshot; a single-file checkpoint's size): what loading adds to memory, read from
    the files' sizes without opening them. 0 for a hub model that is not cached yet."""
    if source.kind == "single_file":
        return os.path.getsize(source.location)
    return sum(os.path.getsize(path) for paths in _component_weight_files(source).values() for path in paths)


def component_weight_bytes(source: ModelSource, dtype: torch.dtype, quantize: str = "none") -> dict[str, int]:
    """{component: bytes its weights take in memory in ``dtype``} of a local folder or cached hub model (the
    ``WEIGHTED_COMPONENTS`` it has), from the safetensors headers' tensor shapes (no weights read): what each
    stage of ``memory.StagePlacement`` puts on the device. With ``quantize`` "int8", the ``QUANTIZED_COMPONENTS``'
    Linear weights count one byte per element and five per row (``quantize_weights``), told from the
    header as the 2-D weights whose name is not an embedding's. Empty for a single-file checkpoint or an uncached
    hub model."""
    element = torch.finfo(dtype).bits // 8
    sizes = {}
    for component, paths in _component_weight_files(source).items():
        size = 0
        for path in paths:
            for name, entry in read_safetensors_header(path).items():
                if name == "__metadata__":
                    continue
                shape = entry["shape"]
                if quantize == "int8" and component in QUANTIZED_COMPONENTS and _is_linear_weight(name, shape):
                    size += math.prod(shape) + shape[0] * 5  # a float32 scale and an int8 zero point per row
                else:
                    size += math.prod(shape) * element
        sizes[component] = size
    return sizes


def _is_linear_weight(name: str, shape: list[int]) -> bool:
    # A Linear layer's weight as a safetensors header names it: 2-D, ".weight", and not a token, position or shared
    # embedding table (2-D as well, but an nn.Embedding, which the int8 quantisation leaves alone).
    return len(shape) == 2 and name.endswith(".weight") and "embedding" not in name and "embed_tokens" not in name \
        and name.split(".")[0] != "shared"


QUANTIZED_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "unet", "transformer")
"""What ``--quantize int8`` quantises: the denoiser and the text encoders, whose weights are mostly Linear layers.
The VAE is small and convolutional and decodes the image itself, so it keeps the job's dtype."""


def quantize_weights(pipeline, mode: str) -> None:
    """Quantise the ``QUANTIZED_COMPONENTS`` of ``pipeline`` in place with ``mode`` ("none": nothing; "int8":
    torchao's weight-only int8, every ``nn.Linear`` weight as int8 values with a scale per output row, the
    activations kept in the job's dtype). Raises BadRequest with one sentence when torchao is not installed."""
    if mode == "none":
        return
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        raise BadRequest(QUANTIZE_NEEDS_TORCHAO) from None
    for name in QUANTIZED_COMPONENTS:
        module = getattr(pipeline, name, None)
        if module is not None:
            quantize_(module, Int8WeightOnlyConfig())


QUANTIZE_NEEDS_TORCHAO = ("--quantize int8 needs torchao, which is not installed in the backend's Python; install it "
                          "with pip install -r requirements-quantize.txt, or leave --quantize none.")


def _component_weight_files(source: ModelSource) -> dict[str, list[str]]:
    # {component: the paths of the safetensors files a job loads}: the variant's files when the folder holds them
    # (model.fp16.safetensors), else the plain ones; empty for a single file or an uncached hub model.
    folder = local_folder(source) if source.kind != "single_file" else None
    if folder is None:
        return {}
    variant = check_model_folder(folder).variant
    files = {}
    for component in WEIGHTED_COMPONENTS:
        if not os.path.isdir(os.path.join(folder, component)):
            continue
        weights = [name for name in sorted(os.listdir(os.path.join(folder, component))) if name.endswith(".safetensors")]
        chosen = [name for name in weights if variant and f".{variant}." in name] or weights
        files[component] = [os.path.join(folder, component, name) for name in chosen]
    return files


def read_model_architecture(source: ModelSource, single_file_config: str | None = None) -> str | None:
    """SD1, SD2 or SDXL of ``source`` without loading weights (``model_manager.architecture_from_configs``): from
    the model_index.json and UNet config of a folder or hub model; of a single-file checkpoint from its
    safetensors header (``single_file_architecture``), else (a pickled checkpoint) from the ``--model-config``
    folder or hub id when given. None when nothing tells (loaded as Stable Diffusion 1/2). Raises ModelNotFound
    or BadRequest as ``read_unet_config`` does."""
    if source.kind != "single_file":
        return architecture_from_configs(_read_config(source, "model_index.json"), read_unet_config(source))
    architecture = single_file_architecture(source.location) if source.location.lower().endswith(".safetensors") else None
    if architecture is None and single_file_config is not None:
        config_kind = "folder" if os.path.isdir(single_file_config) else "hub"
        return read_model_architecture(ModelSource(config_kind, single_file_config))
    return architecture


def geometry_from_configs(vae_config: dict, unet_config: dict) -> ModelGeometry:
    """ModelGeometry from a VAE and a UNet config (dicts, or diffusers' FrozenDict configs).

    The VAE halves the resolution once per block after the first, hence 2^(blocks - 1).
    """
    return ModelGeometry(
        vae_scale_factor=2 ** (len(vae_config["block_out_channels"]) - 1),
        latent_channels=int(vae_config["latent_channels"]),
        sample_size=int(unet_config["sample_size"]),
    )


def _read_config(source: ModelSource, relative_path: str) -> dict:
    if source.kind == "folder":
        path = os.path.join(source.location, relative_path)
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError) as error:
            raise BadRequest(f"The model folder {source.location} has no readable {relative_path} ({error}).")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        path = hf_hub_download(source.location, relative_path)
    except GatedRepoError:
        raise ModelNotFound(
            f"The model {source.location} is gated: accept its licence on huggingface.co and log in with "
            "`huggingface-cli login`, or " + HOW_TO_POINT_LOCALLY + "."
        )
    except RepositoryNotFoundError:
        raise ModelNotFound(
            f"The model {source.location} does not exist on the Hugging Face hub (or is private); "
            "check the id, or " + HOW_TO_POINT_LOCALLY + "."
        )
    except Exception:  # offline, hub unreachable, not cached: all say the same thing to the user
        raise ModelNotFound(
            f"The model {source.location} is not in the local Hugging Face cache and the hub cannot be "
            "reached; " + HOW_TO_POINT_LOCALLY + "."
        )
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def resolve_device(name: str) -> torch.device:
    """Turn 'auto' | 'cpu' | 'cuda' | 'cuda:N' | 'mps' into a torch device; auto prefers cuda, then mps.

    Raises BadRequest when the named device is not available on this machine.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BadRequest(f"The device {name} was asked for, but this machine has no CUDA GPU that torch can use.")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise BadRequest(f"The device {name} does not exist; this machine has {torch.cuda.device_count()} CUDA GPU(s).")
    if name == "mps" and not torch.backends.mps.is_available():
        raise BadRequest("The device mps was asked for, but Apple's Metal backend is not available here.")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is float16 on cuda and mps, float32 on cpu; otherwise the named torch dtype."""
    if name == "auto":
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    return getattr(torch, name)


def pipeline_class(architecture: str | None, model_index: dict | None = None) -> tuple[type, dict]:
    """(the diffusers pipeline class, its loading options) for a model of ``architecture``
    (``read_model_architecture``): ``StableDiffusionXLPipeline`` for SDXL (two text encoders and tokenizers; no
    watermarker: the engine decodes itself), ``StableDiffusion3Pipeline`` for SD3 (told which of its optional
    components its ``model_index`` dict lacks: ``absent_components``), else ``StableDiffusionPipeline`` without
    the safety checker."""
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    if architecture == "SD3":
        return StableDiffusion3Pipeline, absent_components(model_index) if model_index is not None else {}
    if architecture == "SDXL":
        return StableDiffusionXLPipeline, dict(add_watermarker=False)
    return StableDiffusionPipeline, dict(safety_checker=None, requires_safety_checker=False)


def load_model(
    source: ModelSource,
    device: torch.device,
    dtype: torch.dtype,
    allow_pickle: bool = False,
    single_file_config: str | None = None,
    place_on_device: bool = True,
) -> LoadedModel:
    """Load a Stable Diffusion pipeline from ``source`` for ``device`` in ``dtype``: onto the device, or with
    ``place_on_device`` False left in CPU memory for ``memory.StagePlacement`` to move stage by stage.

    The pipeline class is the architecture's (``pipeline_class``). An SDXL VAE whose config asks for
    ``force_upcast`` (SDXL's original VAE, which overflows in float16) is kept in float32 when the job runs in
    half precision, as diffusers' SDXL pipeline upcasts it to decode; the fp16-fix VAE (without it) runs in ``dtype``.
    Only safetensors weights are read unless ``allow_pickle``. ``single_file_config`` (a diffusers folder
    or hub id) gives the component configs of a single-file checkpoint; without it diffusers infers the
    model family and fetches that family's configs from the hub (or its cache). Raises ModelNotFound when
    a hub model is not available, BadRequest when a local model cannot be loaded.
    """
    architecture = read_model_architecture(source, single_file_config)
    sd3_folder = architecture == "SD3" and source.kind != "single_file"
    loader, options = pipeline_class(architecture, _read_config(source, "model_index.json") if sd3_folder else None)
    common = dict(dtype=dtype, **options)
    offline = hub_offline()
    try:
        if source.kind == "single_file":
            pipeline = loader.from_single_file(
                source.location, config=single_file_config, local_files_only=offline, **common
            )
        else:
            pipeline = loader.from_pretrained(
                source.location,
                variant=local_weights_variant(source),
                use_safetensors=None if allow_pickle else True,
                local_files_only=offline or source.kind == "folder",
                **common,
            )
    except Exception as error:  # weights, configs and their loaders fail in many ways; each is the model's fault
        if source.kind == "hub" and isinstance(error, (OSError, ValueError)):
            raise ModelNotFound(
                f"The model {source.location} could not be loaded from the Hugging Face cache or hub; "
                + HOW_TO_POINT_LOCALLY + "."
            ) from error
        raise BadRequest(f"The model at {source.location} could not be loaded: {_first_line(error)}") from error
    pipeline.set_progress_bar_config(disable=True)
    for component in weighted_components(pipeline).values():
        # Inference only: SyncDiffusion differentiates with respect to latents, never the weights.
        component.requires_grad_(False)
    if device.type in CHANNELS_LAST_DEVICES:
        use_channels_last(denoising_model(pipeline), pipeline.vae)  # before any placement: every move keeps the format
    if place_on_device:
        pipeline.to(device)
    upcast_vae = architecture == "SDXL" and getattr(pipeline.vae.config, "force_upcast", False)
    if dtype != torch.float32 and (device.type == "mps" or upcast_vae):
        # Half-precision VAE decodes on MPS can come out black, and SDXL's VAE overflows; the decoders cast
        # latents to the VAE's dtype.
        pipeline.vae.to(torch.float32)
    geometry = geometry_from_configs(pipeline.vae.config, denoising_model(pipeline).config)
    return LoadedModel(pipeline=pipeline, geometry=geometry, source=source, device=device, dtype=dtype,
                       architecture=architecture)


OPTIONAL_TEXT_COMPONENTS = ("text_encoder_3", "tokenizer_3")
"""Components a ``StableDiffusion3Pipeline`` may lack (diffusers allows SD3 without its T5 encoder: zeros stand in
for T5's tokens)."""


def absent_components(model_index: dict) -> dict:
    """{name: None} for each of ``OPTIONAL_TEXT_COMPONENTS`` that a ``model_index.json`` dict names without a class
    (or not at all): what ``from_pretrained`` must be told is absent, or it refuses to load the pipeline."""
    absent = {}
    for name in OPTIONAL_TEXT_COMPONENTS:
        entry = model_index.get(name)
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1]):
            absent[name] = None
    return absent


def resolve_lora_source(spec: str, allow_pickle: bool = False) -> ModelSource:
    """Where ``--lora`` weights come from: a local weights file (kind ``single_file``), a local folder
    holding one, or a hub repo whose snapshot is in the Hugging Face cache (``folder``: location is the
    file), or a hub id to fetch (``hub``). A ``.safetensors`` file's header is checked before anything loads.
    Raises BadRequest, with one sentence, for a missing path, a pickled file (.bin, .pt, .ckpt) without
    ``allow_pickle``, a folder without weights or an unreadable safetensors file; ModelNotFound for a hub
    id that is not cached while downloads are off."""
    path = os.path.abspath(os.path.expanduser(spec))
    if os.path.isdir(path):
        return _lora_in_folder(path, allow_pickle)
    if os.path.isfile(path):
        return _lora_file(path, allow_pickle, "single_file")
    if spec.startswith(("/", ".", "~")) or not HUB_ID.match(spec):
        raise BadRequest(f"The LoRA path {path} does not exist.")
    # A cached hub LoRA loads from its snapshot: diffusers can only guess a hub repo's weights file online.
    snapshot = cached_snapshot(spec)
    if snapshot is not None and _lora_weights(snapshot, allow_pickle):
        return _lora_in_folder(snapshot, allow_pickle)
    if hub_offline():
        raise ModelNotFound(f"The LoRA {spec} is not in the local Hugging Face cache and the hub cannot be reached; "
                            "download it once with network access or point --lora at a local .safetensors file.")
    return ModelSource("hub", spec)


def _lora_weights(folder: str, allow_pickle: bool) -> list[str]:
    """The LoRA weights files directly in ``folder``, by name: ``.safetensors`` (and pickles with ``allow_pickle``)."""
    suffixes = (".safetensors",) + (PICKLE_SUFFIXES if allow_pickle else ())
    return sorted(name for name in os.listdir(folder) if name.lower().endswith(suffixes))


def _lora_in_folder(folder: str, allow_pickle: bool) -> ModelSource:
    """The first weights file of a LoRA folder (``_lora_weights``), as ``_lora_file`` checks it."""
    names = _lora_weights(folder, allow_pickle)
    if not names:
        raise BadRequest(f"The LoRA folder {folder} has no .safetensors weights file.")
    return _lora_file(os.path.join(folder, names[0]), allow_pickle, "folder")


def _lora_file(path: str, allow_pickle: bool, kind: str) -> ModelSource:
    """A LoRA weights file as a ModelSource of ``kind``: refused when pickled without ``allow_pickle``, of
    another format, or (``.safetensors``) with an unsound header."""
    if path.lower().endswith(PICKLE_SUFFIXES) and not allow_pickle:
        raise BadRequest(f"{os.path.basename(path)} is pickled LoRA weights, which can run code when loaded; "
                         "use a .safetensors file or pass --allow-pickle if you trust its source.")
    if not path.lower().endswith((".safetensors",) + PICKLE_SUFFIXES):
        raise BadRequest(f"The LoRA file {path} is neither .safetensors nor a known weights format.")
    if path.lower().endswith(".safetensors"):
        check_safetensors_file(path, "LoRA file")
    return ModelSource(kind, path)


def fuse_lora(model: LoadedModel, source: ModelSource, scale: float) -> None:
    """Load LoRA weights from ``source`` (``resolve_lora_source``) into ``model``'s UNet and text encoder and
    fuse them into the weights at ``scale`` (diffusers' ``load_lora_weights`` / ``fuse_lora``, PEFT), then
    drop the adapter layers, so sampling runs at the plain model's speed. Modifies the model in place, so a
    model whose fuse failed is half-changed and must be dropped (``ModelCache`` does).
    Raises ModelNotFound (hub weights not available) or BadRequest (weights that do not fit the model)."""
    from safetensors import SafetensorError

    pipeline = model.pipeline
    try:
        if source.kind == "hub":
            pipeline.load_lora_weights(source.location, local_files_only=hub_offline(), adapter_name="syncsphere")
        else:
            folder, name = os.path.split(source.location)
            pipeline.load_lora_weights(folder, weight_name=name, adapter_name="syncsphere",
                                       use_safetensors=name.lower().endswith(".safetensors"))
        pipeline.fuse_lora(lora_scale=scale, adapter_names=["syncsphere"])
        pipeline.unload_lora_weights()
    except (OSError, EnvironmentError, SafetensorError) as error:
        if source.kind == "hub":
            raise ModelNotFound(f"The LoRA {source.location} could not be loaded from the Hugging Face cache or hub; "
                                "point --lora at a local .safetensors file.") from error
        raise BadRequest(f"The LoRA weights at {source.location} could not be read: {_first_line(error)}") from error
    except (ValueError, KeyError, RuntimeError) as error:
        raise BadRequest(f"The LoRA weights at {source.location} do not fit this model: {_first_line(error)}") from error
    for component in weighted_components(pipeline).values():
        component.requires_grad_(False)
    if model.device.type in CHANNELS_LAST_DEVICES:
        use_channels_last(denoising_model(pipeline))  # a fused convolution may have come back in the default format


def load_unet_file(model: LoadedModel, path: str) -> None:
    """Replace the weights of ``model``'s UNet with the whole-UNet state dict in the ``.safetensors`` file at
    ``path`` (diffusers' key layout, as SDXL-Lightning's ``sdxl_lightning_4step_unet.safetensors`` ships: the base
    model's UNet config with distilled weights). Every key must match the UNet's, in name and shape; the values
    are copied in the UNet's dtype and device. Modifies the model in place (``ModelCache`` drops a model whose
    load failed). Raises BadRequest with one sentence for an unreadable file or weights that do not fit."""
    from safetensors.torch import load_file

    check_safetensors_file(path, "UNet file")
    unet = denoising_model(model.pipeline)
    try:
        unet.load_state_dict(load_file(path), strict=True)
    except (RuntimeError, KeyError, ValueError) as error:
        raise BadRequest(f"The UNet weights in {path} do not fit this model's UNet ({type(unet).__name__}): "
                         f"{_first_line(error)}") from error


def load_tiny_autoencoder(location: str, device: torch.device, dtype: torch.dtype, latent_channels: int, allow_pickle: bool = False,
                          local_only: bool = False):
    """A diffusers ``AutoencoderTiny`` (TAESD) for SyncDiffusion's guidance decode and the denoising preview.

    location: a hub id (``--sync-decoder taesd`` is the model family's, ``preview.TINY_AUTOENCODER_OF_FAMILY``), or
    a local folder saved with ``save_pretrained``. Only safetensors weights unless ``allow_pickle``. ``local_only``: a
    hub id only from the local cache, never downloaded (the preview's rule: ModelNotFound when it is not there). Its decoder takes the model's
    scaled latents (divided by its own ``scaling_factor``, 1.0) and returns images in [-1, 1].
    Raises ModelNotFound (hub id not available) or BadRequest (unloadable folder, wrong latent channels).
    """
    from diffusers import AutoencoderTiny

    spec = location
    is_folder = os.path.isdir(os.path.abspath(os.path.expanduser(location)))
    if is_folder:
        location = os.path.abspath(os.path.expanduser(location))
    elif not HUB_ID.match(location):
        raise BadRequest(f"--sync-decoder {spec} is neither vae, taesd, a folder nor a hub id.")
    try:
        decoder = AutoencoderTiny.from_pretrained(
            location, torch_dtype=dtype, use_safetensors=None if allow_pickle else True,
            local_files_only=hub_offline() or is_folder or local_only,
        )
    except (OSError, ValueError, EnvironmentError) as error:
        if not is_folder:
            raise ModelNotFound(
                f"The tiny autoencoder {location} could not be loaded from the Hugging Face cache or hub; "
                "download it once with network access or pass a local AutoencoderTiny folder to --sync-decoder."
            ) from error
        raise BadRequest(f"The tiny autoencoder at {location} could not be loaded: {_first_line(error)}") from error
    if decoder.config.latent_channels != latent_channels:
        raise BadRequest(
            f"The tiny autoencoder {location} decodes {decoder.config.latent_channels}-channel latents, but this "
            f"model's have {latent_channels}; use one made for this model family."
        )
    return decoder.to(device).requires_grad_(False).eval()


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__).rstrip(".") + "."


class ModelCache:
    """Keeps the last loaded model so consecutive jobs with the same model skip loading (the server).

    Its entry is only ever replaced by a model that loaded completely, LoRA fused: a failed load or fuse
    leaves the entry as it was, and the new model, half-fused or not, goes with its exception. While the
    next model loads, the previous one waits in CPU memory, so the device never holds both; it is dropped
    when the new one is complete, and after a failure it goes back to its devices when it is next asked for
    (not at once: until its exception is gone, the failed model still holds its device memory). The cached
    model carries its UNet compiled by the first ``--compile`` job (``compiled_unet``), so later ones reuse it.
    """

    def __init__(self):
        self._key = None
        self._model: LoadedModel | None = None
        self._parked: list = []  # [(module, the device it came from)] of the cached model

    def get(self, request, on_device: bool | None = None) -> LoadedModel:
        """The model of ``request`` (a ``resolve.CheckedRequest`` or ``ResolvedRequest``: its source, lora,
        device, dtype and params): the cached one when source, device, dtype and config match, else loaded
        (with the LoRA fused in; ``on_device`` as ``_load_with_lora`` takes it: where a new load puts it). Raises ModelNotFound or BadRequest with one sentence, and then still holds
        the model it held before."""
        params = request.params
        key = (request.source, request.device, request.dtype, params.allow_pickle, params.model_config,
               params.unet_file, request.lora, params.lora_scale, params.quantize)
        if key == self._key:
            for module, device in self._parked:
                module.to(device)
            self._parked = []
            return self._model
        _park_in_cpu_memory(self._model, self._parked)
        model = _load_with_lora(request, on_device)
        self._key, self._model, self._parked = key, model, []
        return model


def _park_in_cpu_memory(model: LoadedModel | None, parked: list) -> None:
    """Move the torch modules of ``model``'s pipeline that are on a GPU (all of them after a full job, some
    after a low-memory one) into CPU memory, first adding each as (module, its device) to ``parked``."""
    for module in model.pipeline.components.values() if model is not None else ():
        first = next(module.parameters(), None) if isinstance(module, torch.nn.Module) else None
        if first is not None and first.device.type != "cpu":
            parked.append((module, first.device))
            module.to("cpu")


def _load_with_lora(request, on_device: bool | None = None) -> LoadedModel:
    """Load ``request``'s model (``ModelCache.get``; onto its device or, with ``on_device`` False, into CPU memory;
    None: onto the device unless ``--memory low`` on a GPU), its UNet weights from ``--unet-file`` when given, and
    fuse its LoRA in; a model whose UNet load or fuse failed is lost with the exception, as it must be."""
    params = request.params
    # A low-memory job on a GPU, or a model whose weights together would not fit there (SD3 with its T5 encoder on
    # an 8 GB card: ``memory.loads_on_device``), loads into CPU memory; each stage moves in what it runs.
    on_device = (params.memory != "low" or request.device.type == "cpu") if on_device is None else on_device
    # A quantised model is loaded and quantised in CPU memory: its float weights may not fit the device.
    quantized = params.quantize != "none"
    model = load_model(request.source, request.device, request.dtype, params.allow_pickle, params.model_config,
                       place_on_device=on_device and not quantized)
    if params.unet_file is not None:
        load_unet_file(model, params.unet_file)
    if request.lora is not None:
        fuse_lora(model, request.lora, params.lora_scale)  # into the float weights, before they are quantised
    quantize_weights(model.pipeline, params.quantize)
    if quantized and on_device:
        for module in weighted_components(model.pipeline).values():
            module.to(request.device)  # .to(device) only: an upcast VAE keeps its float32
    return model
