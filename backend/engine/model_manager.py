"""Installed models: list, download and remove Stable Diffusion models (``python -m backend models``).

Models live in the Hugging Face cache (hub ids) or in folders the user points at (the add-on's model folder:
diffusers folders and single-file ``.safetensors`` checkpoints). All hub traffic goes through
``huggingface_hub``; this module has no HTTP client of its own.

**What a download fetches** (``select_engine_files``): only what the engine loads with
``StableDiffusionPipeline.from_pretrained(..., use_safetensors=True, safety_checker=None)``:
``model_index.json``; for every component that file names (except ``safety_checker``, which the engine
never loads), the ``.json``/``.txt``/``.model`` files of its folder (configs, tokenizer files); and for a
component with weights (its folder has a ``config.json``) ONE safetensors variant: the fp16 variant
(``*.fp16.safetensors``) when asked for and present, else the plain ``*.safetensors`` (with its shards and
shard index when sharded). Never ``.bin``/``.ckpt``/``.pt``, other variants (``ema``, ``non_ema``, fp16 when
not asked), root-level checkpoints or Flax/ONNX files: Stable Diffusion 2 base is about 5.2 GB, not 15.

**Complete or partial** (``check_model_folder``): complete when ``model_index.json`` is present and every
component the engine loads has its folder with a ``.json`` file and, if it has a ``config.json`` (a model
rather than a scheduler/tokenizer/feature extractor), one complete safetensors weight set (a single file, or
an index whose shards are all there). ``list`` names an interrupted download's ``*.incomplete`` blob among
the missing files of a partial entry; a completed download deletes such leftovers.

**Families** (``model_family``), read from the configs, first rule that holds:

- ``LCM``: the scheduler config's ``_class_name`` is ``LCMScheduler``, or the UNet config has a
  ``time_cond_proj_dim`` (a guidance-distilled Latent Consistency Model);
- ``Turbo``: the scheduler's ``timestep_spacing`` is ``trailing`` (how SD-Turbo and SDXL-Turbo ship, and
  what ``generation.make_scheduler`` treats as a few-step model);
- ``SD3``: ``model_index.json``'s ``_class_name`` starts with ``StableDiffusion3``, or its ``transformer`` is an
  ``SD3Transformer2DModel`` (a flow-matching MMDiT; its config stands where a UNet's does);
- ``SDXL``: ``model_index.json``'s ``_class_name`` contains ``XL``, it names a ``text_encoder_2``, or the
  UNet's ``addition_embed_type`` is ``text_time`` or its ``cross_attention_dim`` is 2048;
- ``SD2``: the UNet's ``cross_attention_dim`` is 1024 (OpenCLIP ViT-H);
- ``SD1``: it is 768 (CLIP ViT-L);
- otherwise unknown (None). ``architecture`` is the SD1/SD2/SDXL rule alone, so an SD-Turbo model is
  family ``Turbo``, architecture ``SD2``. Single-file checkpoints get their architecture from the
  safetensors header (the cross-attention key width), without reading weights.

**Resuming.** Files are fetched one by one into the cache, small files first, then weights; each finished
file stays in the cache, so after a failure or Ctrl-C the same download skips them and fetches the rest.
Within one file, huggingface_hub retries a dropped connection with an HTTP Range request from the last
whole chunk it wrote (10 MB chunks); huggingface_hub (2.x) deletes the partial file of a download that
fails for good, so a file that was cut off restarts from zero on the next run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import BadRequest, JobCancelled, ModelNotFound, SyncSphereError

# Here rather than in backend/engine/models.py, which imports torch: ``models list|download|remove`` start fast.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
HOW_TO_POINT_LOCALLY = (
    "pass a local diffusers folder or a .safetensors file with --model PATH, "
    "or download the model once with network access"
)
# What a download that cannot reach the hub suggests instead. Not HOW_TO_POINT_LOCALLY: ``models download`` (and
# the add-on's Download button) has no --model, so the sentence names the command whose flag it is.
HOW_TO_DO_WITHOUT_THE_HUB = (
    "download it again with network access, or give generate a local diffusers folder or .safetensors file "
    "with --model PATH"
)


def hub_offline() -> bool:
    """True when the user asked for no network (``HF_HUB_OFFLINE``; the Blender add-on sets it when
    Blender's online access is off)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() not in ("0", "", "false", "no", "off")


# (bytes_done, bytes_total, current file or None when finished) -> True to cancel the download.
DownloadProgress = Callable[[int, int, "str | None"], "bool | None"]

ENGINE_SKIPPED_COMPONENTS = ("safety_checker",)  # load_model passes safety_checker=None
WEIGHTED_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "unet", "transformer", "vae")
"""The pipeline components with weights that a job loads, places and runs: the text encoder (SDXL's second one
too, SD3's second and third where the model has them), the UNet (SD3: the transformer) and the VAE."""
CONFIG_SUFFIXES = (".json", ".txt", ".model")  # configs, tokenizer vocabularies and merges, sentencepiece
WEIGHTS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")  # pickled weights: loading them can run code
SAFETENSORS_HEADER_LIMIT = 100_000_000  # safetensors refuses longer headers ("header too large")
SHARD = re.compile(r"-\d{5}-of-\d{5}")
TOKEN_HELP = "log in with `huggingface-cli login` (or `hf auth login`) or set the HF_TOKEN environment variable"


@dataclass
class InstalledModel:
    """One model ``list_models`` found.

    id: the hub id, or the absolute path of a local folder or file. kind: ``hub``, ``folder`` or
    ``single_file``. path: where it is on disk (the cached snapshot folder for hub models). size: bytes on
    disk (a hub model's blobs, including partial downloads). family / architecture: see the module
    docstring (None when unknown). complete: every file the engine loads is there; missing: what is not.
    variant: ``fp16`` when some component has only fp16 weights (load with ``variant="fp16"``), else None.
    window_px: the model's native view size in image pixels (``native_window_px``), None when unknown.
    """

    id: str
    kind: str
    path: str
    size: int
    family: str | None
    architecture: str | None
    complete: bool
    missing: list[str] = field(default_factory=list)
    variant: str | None = None
    window_px: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DownloadResult:
    """What ``download_model`` did: the snapshot folder ``path`` (what the engine loads for ``model_id``),
    the repo ``files`` the engine needs, their ``bytes_total``, the bytes this call ``fetched`` (0 when
    everything was cached), and the weights ``variant`` (``check_model_folder``'s: ``fp16`` or None)."""

    model_id: str
    path: str
    files: list[str]
    bytes_total: int
    fetched: int
    variant: str | None


@dataclass
class ModelCheck:
    """What ``check_model_folder`` found: ``missing`` files or components (empty when complete) and the
    weights ``variant``: ``fp16`` when some component has only its fp16 weights, so that diffusers must
    load the folder with ``variant="fp16"`` (it takes the plain weights of the others), else None."""

    missing: list[str]
    variant: str | None

    @property
    def complete(self) -> bool:
        return not self.missing


# --- which files the engine loads -------------------------------------------------------------------


def engine_components(model_index: dict) -> list[str]:
    """The component folders the engine loads, from a ``model_index.json`` dict: entries whose value is a
    ``[library, class]`` pair with a class, except ``safety_checker``."""
    names = []
    for name, value in model_index.items():
        if name.startswith("_") or name in ENGINE_SKIPPED_COMPONENTS:
            continue
        if isinstance(value, (list, tuple)) and len(value) == 2 and value[1]:
            names.append(name)
    return sorted(names)


def weights_variant(filename: str) -> str | None:
    """The variant in a safetensors weight or shard-index file name: ``fp16`` for
    ``diffusion_pytorch_model.fp16.safetensors``, ``model.fp16-00001-of-00002.safetensors`` or
    ``model.safetensors.index.fp16.json``; None for the plain weights."""
    name = filename.rsplit("/", 1)[-1]
    if name.endswith(".json"):
        stem = name[: -len(".json")].replace(".safetensors.index", "")
    else:
        stem = name[: -len(WEIGHTS_SUFFIX)]
    stem = SHARD.sub("", stem)
    parts = [part for part in stem.split(".")[1:] if part]
    return ".".join(parts) or None


def _is_weights(name: str) -> bool:
    return name.endswith(WEIGHTS_SUFFIX)


def _is_shard_index(name: str) -> bool:
    return ".safetensors.index" in name and name.endswith(".json")


def _is_other_index(name: str) -> bool:
    """Shard indexes of pickled weights (``*.bin.index.json``): never needed."""
    return ".index" in name and name.endswith(".json") and not _is_shard_index(name)


def _choose_variant(variants: set, fp16: bool) -> str | None | bool:
    """The variant to fetch among ``variants`` (None is the plain weights); False when there is none."""
    if fp16 and "fp16" in variants:
        return "fp16"
    if None in variants:
        return None
    if "fp16" in variants:  # a repo that ships only half-precision weights
        return "fp16"
    return False


def select_engine_files(repo_files, model_index: dict, fp16: bool = False, model_id: str = "the model") -> list[str]:
    """The repo files a download fetches (module docstring), small files first, then weights.

    repo_files: every file name in the repo (``/``-separated); model_index: its ``model_index.json``.
    Raises BadRequest when a component with weights has no safetensors weights (pickled weights only).
    """
    files = set(repo_files)
    configs, weights = ["model_index.json"], []
    for component in engine_components(model_index):
        own = sorted(name for name in files if name.startswith(component + "/") and "/" not in name[len(component) + 1:])
        configs += [name for name in own if name.endswith(CONFIG_SUFFIXES) and not _is_shard_index(name)
                    and not _is_other_index(name)]
        if f"{component}/config.json" not in files:
            continue  # a scheduler, tokenizer or feature extractor: configs only
        candidates = [name for name in own if _is_weights(name) or _is_shard_index(name)]
        variant = _choose_variant({weights_variant(name) for name in candidates}, fp16)
        if variant is False:
            raise BadRequest(
                f"The model {model_id} has no .safetensors weights for its {component} (only pickled ones, which "
                "can run code when loaded), so it cannot be downloaded for the engine."
            )
        weights += [name for name in candidates if weights_variant(name) == variant]
    return configs + sorted(weights)


# --- what is on disk --------------------------------------------------------------------------------


def _read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _complete_weight_variants(folder: str) -> set:
    """Variants (None: plain) with a complete safetensors weight set in a component folder."""
    try:
        names = set(os.listdir(folder))
    except OSError:
        return set()
    complete = set()
    for name in names:
        if _is_weights(name) and not SHARD.search(name) and os.path.isfile(os.path.join(folder, name)):
            complete.add(weights_variant(name))
        elif _is_shard_index(name):
            index = _read_json(os.path.join(folder, name)) or {}
            shards = set((index.get("weight_map") or {}).values())
            if shards and all(os.path.isfile(os.path.join(folder, shard)) for shard in shards):
                complete.add(weights_variant(name))
    return complete


def check_model_folder(folder: str) -> ModelCheck:
    """Whether a diffusers folder (or cached snapshot) holds every file the engine loads (module docstring).

    Returns a ModelCheck whose ``missing`` lists what is not there, e.g. ``model_index.json``, ``unet``
    (no folder or no config) or ``unet weights``.
    """
    model_index = _read_json(os.path.join(folder, "model_index.json"))
    if model_index is None:
        return ModelCheck(["model_index.json"], None)
    missing, variants = [], []
    for component in engine_components(model_index):
        path = os.path.join(folder, component)
        if not os.path.isdir(path) or not any(name.endswith(".json") for name in os.listdir(path)):
            missing.append(component)
            continue
        if not os.path.isfile(os.path.join(path, "config.json")):
            continue  # scheduler, tokenizer, feature extractor: no weights
        available = _complete_weight_variants(path)
        choice = _choose_variant(available, fp16=False)
        if choice is False:
            missing.append(f"{component} weights")
        else:
            variants.append(choice)
    # One fp16-only component is enough: the engine must then load with variant="fp16", and diffusers falls
    # back to the plain weights of the components that have no fp16 variant.
    return ModelCheck(missing, "fp16" if "fp16" in variants else None)


def architecture_from_configs(model_index: dict, unet: dict) -> str | None:
    """SD1, SD2, SDXL or SD3 from a ``model_index.json`` dict and the UNet's (SD3: the transformer's) config dict
    (the module docstring's rules); None when they do not tell."""
    class_name = str(model_index.get("_class_name", ""))
    transformer = model_index.get("transformer")
    if class_name.startswith("StableDiffusion3") or (isinstance(transformer, (list, tuple)) and len(transformer) == 2
                                                     and transformer[1] == "SD3Transformer2DModel"):
        return "SD3"
    width = unet.get("cross_attention_dim")
    if "XL" in class_name or "text_encoder_2" in model_index or unet.get("addition_embed_type") == "text_time" \
            or width == 2048:
        return "SDXL"
    return {1024: "SD2", 768: "SD1"}.get(width)


def denoiser_component(model_index: dict) -> str:
    """The folder of a model's denoising network, from its ``model_index.json`` dict: ``transformer`` for a
    diffusion transformer (SD3), else ``unet``."""
    transformer = model_index.get("transformer")
    return "transformer" if isinstance(transformer, (list, tuple)) and len(transformer) == 2 and transformer[1] else "unet"


def model_family(folder: str) -> tuple[str | None, str | None]:
    """(family, architecture) of a diffusers folder from its configs (rules in the module docstring);
    None for what the configs do not tell."""
    model_index = _read_json(os.path.join(folder, "model_index.json")) or {}
    unet = _read_json(os.path.join(folder, denoiser_component(model_index), "config.json")) or {}
    scheduler = _read_json(os.path.join(folder, "scheduler", "scheduler_config.json")) or {}
    architecture = architecture_from_configs(model_index, unet)
    if scheduler.get("_class_name") == "LCMScheduler" or unet.get("time_cond_proj_dim"):
        return "LCM", architecture
    if scheduler.get("timestep_spacing") == "trailing":
        return "Turbo", architecture
    return architecture, architecture


def native_window_px(folder: str) -> int | None:
    """The native view size in image pixels of a diffusers folder: its denoiser's trained ``sample_size`` (the
    UNet's, or a transformer's) times the VAE's downsampling factor (2 per extra VAE block): 512 for SD 1.x and
    SD2-base, 768 for SD 2.x 768-v, 1024 for SDXL. None when the configs do not say."""
    vae = _read_json(os.path.join(folder, "vae", "config.json")) or {}
    blocks = vae.get("block_out_channels")
    for denoiser in ("unet", "transformer"):
        size = (_read_json(os.path.join(folder, denoiser, "config.json")) or {}).get("sample_size")
        if isinstance(size, int) and isinstance(blocks, list) and blocks:
            return size * 2 ** (len(blocks) - 1)
    return None


def read_safetensors_header(path: str) -> dict:
    """The JSON header of the ``.safetensors`` file at ``path`` (tensor name -> ``dtype``, ``shape``,
    ``data_offsets``; plus ``__metadata__``), read without its tensors: 8 bytes of little-endian header
    length, then the header. Checks what safetensors checks before it loads anything: a header inside the
    file that is a JSON object, and tensor data that fills the rest of the file exactly (a truncated file
    ends short). Raises ValueError saying what is wrong, OSError when the file cannot be read."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if size < 8:
            raise ValueError(f"it is only {size} bytes long")
        (length,) = struct.unpack("<Q", f.read(8))
        if length > min(size - 8, SAFETENSORS_HEADER_LIMIT):
            raise ValueError(f"its header would be {length} bytes long, but the file has {size}")
        try:
            header = json.loads(f.read(length))
        except ValueError:
            raise ValueError("its header is not JSON") from None
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(offset, int) for offset in offsets)):
            raise ValueError(f"its header has no data offsets for {name}")
        end = max(end, offsets[1])
    if end != size - 8 - length:
        raise ValueError(f"its tensors take {end} bytes, but the file holds {size - 8 - length} after the header")
    return header


def check_safetensors_file(path: str, what: str = "checkpoint") -> None:
    """Refuse, before anything loads, a ``.safetensors`` file whose header says it is truncated or not
    safetensors at all (``read_safetensors_header``; reads the header only). what: how the sentence names
    the file (``checkpoint``, ``LoRA file``, ``weights file``). Raises BadRequest with one sentence."""
    try:
        read_safetensors_header(path)
    except (OSError, ValueError) as error:
        raise BadRequest(f"The {what} {path} is not a readable safetensors file (it is truncated or not "
                         f"safetensors: {error}).") from error


def check_folder_weights(folder: str, allow_pickle: bool = False) -> None:
    """Refuse, before anything loads, a diffusers folder whose weights the engine cannot load: a component
    with no weights at all, one with only pickled weights (``.bin``, ``.ckpt``...) without ``allow_pickle``,
    or an unreadable ``.safetensors`` file (``check_safetensors_file``). Reads listings, configs and the
    weights' headers. A missing component folder is left to diffusers, which names it. Raises BadRequest."""
    model_index = _read_json(os.path.join(folder, "model_index.json"))
    if model_index is None:
        raise BadRequest(f"The folder {folder} is not a diffusers model (its model_index.json is not a JSON object).")
    for item in check_model_folder(folder).missing:
        component = item[: -len(" weights")] if item.endswith(" weights") else None
        if component is None:
            continue
        if not any(name.endswith(PICKLE_SUFFIXES) for name in os.listdir(os.path.join(folder, component))):
            raise BadRequest(f"The model folder {folder} has no weights for its {component} "
                             "(no .safetensors or pickled files).")
        if not allow_pickle:
            raise BadRequest(f"The model folder {folder} has no .safetensors weights for its {component}; its pickled "
                             "weights can run code when loaded, so pass --allow-pickle if you trust its source.")
    for component in engine_components(model_index):
        path = os.path.join(folder, component)
        if os.path.isfile(os.path.join(path, "config.json")):
            for name in sorted(os.listdir(path)):
                if _is_weights(name):
                    check_safetensors_file(os.path.join(path, name), "weights file")


def single_file_architecture(path: str) -> str | None:
    """SD1/SD2/SDXL of a single-file ``.safetensors`` checkpoint from its header (tensor names and shapes,
    no weights read): SDXL has ``conditioner.embedders.1``; otherwise the UNet's cross-attention key width
    (768 SD1, 1024 SD2). None when the header does not tell."""
    try:
        header = read_safetensors_header(path)
    except (OSError, ValueError):
        return None
    if any(key.startswith("conditioner.embedders.1.") for key in header):
        return "SDXL"
    for key, value in header.items():
        if key.startswith("model.diffusion_model.") and key.endswith("attn2.to_k.weight"):
            shape = value.get("shape") if isinstance(value, dict) else None
            return {768: "SD1", 1024: "SD2", 2048: "SDXL"}.get(shape[1] if shape and len(shape) == 2 else None)
    return None


def _size_on_disk(path: str) -> int:
    """Bytes of the regular files under ``path`` (symlinks not followed), or of the file itself."""
    if os.path.isfile(path) and not os.path.islink(path):
        return os.path.getsize(path)
    total = 0
    for root, _, names in os.walk(path):
        for name in names:
            full = os.path.join(root, name)
            if not os.path.islink(full):
                try:
                    total += os.path.getsize(full)
                except OSError:
                    pass
    return total


# --- list ------------------------------------------------------------------------------------------


def _cache_dir(cache_dir: str | None) -> str:
    """The hub cache folder: ``cache_dir``, else ``HF_HUB_CACHE`` as it is now, else huggingface_hub's
    (which read ``HF_HUB_CACHE`` / ``HF_HOME`` when it was imported)."""
    from huggingface_hub import constants

    chosen = cache_dir or os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE
    return os.path.abspath(os.path.expanduser(os.path.expandvars(chosen)))


def _endpoint(endpoint: str | None) -> str | None:
    """The hub: ``endpoint``, else ``HF_ENDPOINT`` as it is now (huggingface_hub reads it once, at import),
    else None: huggingface_hub's default."""
    chosen = endpoint or os.environ.get("HF_ENDPOINT", "")
    return chosen.rstrip("/") or None


def _repo_folder(cache_dir: str, model_id: str) -> str:
    from huggingface_hub.file_download import repo_folder_name

    return os.path.join(cache_dir, repo_folder_name(repo_id=model_id, repo_type="model"))


def _main_revision(repo):
    """The cached revision ``main`` points to, else the most recently modified one (None if none)."""
    revisions = sorted(repo.revisions, key=lambda revision: revision.last_modified, reverse=True)
    for revision in revisions:
        if "main" in revision.refs:
            return revision
    return revisions[0] if revisions else None


def _looks_like_pipeline(snapshot: str) -> bool:
    return any(os.path.exists(os.path.join(snapshot, name)) for name in ("model_index.json", "unet", "vae"))


def _hub_models(cache_dir: str) -> list[InstalledModel]:
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        scan = scan_cache_dir(cache_dir)
    except (CacheNotFound, ValueError):
        return []
    found = []
    for repo in scan.repos:
        revision = _main_revision(repo)
        if repo.repo_type != "model" or revision is None or not _looks_like_pipeline(str(revision.snapshot_path)):
            continue  # the cache also holds text models, tiny autoencoders, loss networks...
        snapshot = str(revision.snapshot_path)
        incomplete = [f for f in scan.incomplete_files if repo.repo_path in f.file_path.parents]
        check = check_model_folder(snapshot)
        # A partial blob left by a killed download does not make a model whose files are all there partial.
        missing = check.missing + (["an interrupted download (.incomplete)"] if incomplete and check.missing else [])
        family, architecture = model_family(snapshot)
        found.append(InstalledModel(
            id=repo.repo_id, kind="hub", path=snapshot,
            size=repo.size_on_disk + sum(f.size_on_disk for f in incomplete),
            family=family, architecture=architecture, complete=not missing, missing=missing, variant=check.variant,
            window_px=native_window_px(snapshot),
        ))
    return sorted(found, key=lambda model: model.id.lower())


def _folder_model(path: str) -> InstalledModel:
    check = check_model_folder(path)
    family, architecture = model_family(path)
    return InstalledModel(id=path, kind="folder", path=path, size=_size_on_disk(path), family=family,
                          architecture=architecture, complete=check.complete, missing=check.missing,
                          variant=check.variant, window_px=native_window_px(path))


def _single_file_model(path: str) -> InstalledModel:
    architecture = single_file_architecture(path)
    return InstalledModel(id=path, kind="single_file", path=path, size=os.path.getsize(path), family=architecture,
                          architecture=architecture, complete=True)


def _local_models(folder: str) -> list[InstalledModel]:
    """The models in one local folder: the folder itself when it is a diffusers model, else its diffusers
    subfolders and ``.safetensors`` files."""
    folder = os.path.abspath(os.path.expanduser(folder))
    if os.path.isfile(os.path.join(folder, "model_index.json")):
        return [_folder_model(folder)]
    if not os.path.isdir(folder):
        raise BadRequest(f"The model folder {folder} does not exist.")
    found = []
    for name in sorted(os.listdir(folder), key=str.lower):
        path = os.path.join(folder, name)
        if os.path.isfile(os.path.join(path, "model_index.json")):
            found.append(_folder_model(path))
        elif name.lower().endswith(WEIGHTS_SUFFIX) and os.path.isfile(path):
            found.append(_single_file_model(path))
    return found


def list_models(cache_dir: str | None = None, model_folders=()) -> list[InstalledModel]:
    """The Stable Diffusion models in the Hugging Face cache and in ``model_folders``.

    cache_dir: the hub cache (default: huggingface_hub's, from ``HF_HUB_CACHE`` / ``HF_HOME``); a cache
    repo is listed when its snapshot has ``model_index.json``, ``unet/`` or ``vae/``. model_folders:
    local folders (the add-on's model folder): each is a diffusers model itself, or holds diffusers
    subfolders and single-file ``.safetensors`` checkpoints. Returns InstalledModel entries, cached models
    first (by id), then each folder's. Raises BadRequest for a model folder that does not exist.
    """
    models = _hub_models(_cache_dir(cache_dir))
    for folder in model_folders:
        models += _local_models(folder)
    return models


# --- download --------------------------------------------------------------------------------------


def _offline() -> bool:
    """Downloads are off: ``HF_HUB_OFFLINE`` now (``hub_offline``) or when huggingface_hub was
    imported (it reads the variable once)."""
    from huggingface_hub import constants

    return hub_offline() or constants.is_offline_mode()


def _check_hub_id(model_id: str, action: str) -> None:
    """BadRequest unless ``model_id`` is a hub id rather than a local path."""
    path = os.path.abspath(os.path.expanduser(model_id))
    if os.path.exists(path) or model_id.startswith(("/", ".", "~")) or "\\" in model_id:
        raise BadRequest(
            f"{model_id} is a local path, not a Hugging Face hub id; SyncSphere does not {action} folders or "
            "files you point at."
        )
    if not HUB_ID.match(model_id):
        never = ": hub ids never start with '-'" if model_id.startswith("-") else ""
        raise BadRequest(f"{model_id} is not a Hugging Face hub id (like stabilityai/stable-diffusion-2-base){never}.")


def _cached_snapshot(cache_dir: str, model_id: str, revision: str | None) -> str | None:
    """The cached snapshot folder of ``revision`` (default main), or None."""
    storage = _repo_folder(cache_dir, model_id)
    ref = revision or "main"
    commit = ref
    ref_path = os.path.join(storage, "refs", ref)
    if os.path.isfile(ref_path):
        with open(ref_path, encoding="utf-8") as f:
            commit = f.read().strip()
    snapshot = os.path.join(storage, "snapshots", commit)
    return snapshot if os.path.isdir(snapshot) else None


def cached_snapshot(repo_id: str, cache_dir: str | None = None) -> str | None:
    """The folder of the hub repo ``repo_id``'s main revision in the Hugging Face cache (default: the
    user's), however much of it was fetched; None when the cache has none."""
    return _cached_snapshot(_cache_dir(cache_dir), repo_id, None)


def is_cached(model_id: str, cache_dir: str | None = None) -> bool:
    """Whether the Hugging Face cache holds a complete copy of hub model ``model_id`` (main revision): every
    file the engine loads (``check_model_folder``), so loading it needs no download."""
    snapshot = cached_snapshot(model_id, cache_dir)
    return bool(snapshot) and check_model_folder(snapshot).complete


def _not_reachable(model_id: str, offline: bool) -> ModelNotFound:
    why = "downloads are off (HF_HUB_OFFLINE is set)" if offline else "the hub cannot be reached"
    return ModelNotFound(
        f"The model {model_id} is not in the local Hugging Face cache and {why}; " + HOW_TO_DO_WITHOUT_THE_HUB + "."
    )


def _from_cache_or_raise(model_id: str, cache_dir: str, revision: str | None, offline: bool) -> DownloadResult:
    """The complete cached copy when the hub is off or unreachable; else the offline error."""
    snapshot = _cached_snapshot(cache_dir, model_id, revision)
    check = check_model_folder(snapshot) if snapshot else None
    if check is None or not check.complete:
        raise _not_reachable(model_id, offline)
    files = sorted(str(p.relative_to(snapshot)).replace(os.sep, "/") for p in Path(snapshot).rglob("*") if p.is_file())
    return DownloadResult(model_id, snapshot, files, _size_on_disk(_repo_folder(cache_dir, model_id)), 0, check.variant)


def _first_line(error: BaseException) -> str:
    """The first line of an error's text without its URL (which the sentence names otherwise)."""
    lines = str(error).strip().splitlines()
    line = lines[0] if lines else type(error).__name__
    return re.sub(r"\s+for url:? '?[a-z]+://[^\s']+'?", "", line).rstrip(" .:") or type(error).__name__


def _is_hub_or_network_error(error: BaseException) -> bool:
    """An error of the hub or the network (huggingface_hub's errors are OSErrors; its HTTP client's are
    not, and their module has changed between versions: httpx, httpx2, requests), not one of ours."""
    if isinstance(error, SyncSphereError):
        return False
    root = type(error).__module__.split(".")[0]
    return isinstance(error, (OSError, TimeoutError)) or root in ("httpx", "httpx2", "httpcore", "requests", "urllib3", "ssl")


def _hub_error(model_id: str, error: Exception) -> SyncSphereError | None:
    """One sentence for the hub's refusals: gated, private or missing repos, bad revisions, 401/403."""
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(error, GatedRepoError):
        return ModelNotFound(
            f"The model {model_id} is gated: the hub needs a token from an account that has accepted its licence "
            f"on huggingface.co; {TOKEN_HELP}, then download again."
        )
    if isinstance(error, RepositoryNotFoundError):
        return ModelNotFound(
            f"The model {model_id} was not found on the Hugging Face hub: check the id, and if it is private, "
            f"{TOKEN_HELP} with a token that can read it."
        )
    if isinstance(error, RevisionNotFoundError):
        return BadRequest(f"The model {model_id} has no revision by that name on the Hugging Face hub.")
    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(error, HfHubHTTPError) and status in (401, 403):
        return ModelNotFound(
            f"The Hugging Face hub refused access to the model {model_id} (HTTP {status}): a token that can read "
            f"it is needed; {TOKEN_HELP}."
        )
    return None


def _progress_bar_class(on_bytes: Callable[[int], None]):
    """A tqdm class for huggingface_hub's ``tqdm_class`` that draws nothing and hands each byte count
    to ``on_bytes``. It defines ``update_transfer`` so that Xet downloads report file bytes through
    ``update`` once, not twice (once for network bytes)."""
    from tqdm import tqdm

    class ForwardingBar(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs.pop("name", None)
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            if n:
                on_bytes(int(n))
            return super().update(n)

        def update_transfer(self, n=1):  # network bytes (Xet): the file bytes come through update()
            pass

        def set_transfer_postfix_str(self, *args, **kwargs):
            pass

    return ForwardingBar


class _Tally:
    """Bytes done of a download, reported to the caller's progress callback (which may cancel)."""

    def __init__(self, model_id: str, total: int, done: int, progress: DownloadProgress | None):
        self.model_id, self.total, self.done, self.progress = model_id, total, done, progress
        self.fetched = 0
        self.current: str | None = None

    def report(self) -> None:
        if self.progress is not None and self.progress(self.done, self.total, self.current):
            raise JobCancelled(
                f"The download of {self.model_id} was cancelled; the files fetched so far are kept, so the same "
                "download resumes it."
            )

    def add(self, n: int) -> None:
        self.done += n
        self.fetched += n
        self.report()


def _raise_unless_unreachable(model_id: str, error: Exception) -> None:
    """Raise ``error`` again unless the hub or the network failed, and the one-sentence refusal when the hub
    refused (gated, private, missing: ``_hub_error``); return only for a download that could not get through,
    which the caller words."""
    if not _is_hub_or_network_error(error):
        raise error
    refusal = _hub_error(model_id, error)
    if refusal is not None:
        raise refusal from error


def _fetch_file(model_id: str, name: str, commit: str, bar_class, fetch: dict) -> None:
    """One file into the cache (huggingface_hub's hf_hub_download); failures become one sentence."""
    from huggingface_hub import hf_hub_download

    try:
        hf_hub_download(model_id, name, revision=commit, tqdm_class=bar_class, **fetch)
    except Exception as error:
        _raise_unless_unreachable(model_id, error)
        raise ModelNotFound(
            f"The download of {model_id} stopped while fetching {name} ({_first_line(error)}); the files fetched "
            "so far are kept, so running the same download again resumes it."
        ) from error


def download_model(
    model_id: str,
    fp16: bool = False,
    progress: DownloadProgress | None = None,
    *,
    revision: str | None = None,
    endpoint: str | None = None,
    cache_dir: str | None = None,
    token: str | bool | None = None,
) -> DownloadResult:
    """Download what the engine loads of the hub model ``model_id`` into the Hugging Face cache.

    fp16: fetch the ``*.fp16.safetensors`` variant of each component that has one. progress: called as
    ``progress(bytes_done, bytes_total, current_file)`` at each file's start and for every chunk written,
    and once with ``current_file`` None at the end; bytes already in the cache count as done from the
    first call; returning True cancels (JobCancelled). revision: a branch, tag or commit (default main).
    endpoint: the hub (default ``HF_ENDPOINT``); cache_dir: the cache (default ``HF_HUB_CACHE``); token:
    as huggingface_hub takes it (default: ``HF_TOKEN`` or the stored login).

    Files already cached are skipped, so a second call after a failed or cancelled one resumes. Offline
    (``HF_HUB_OFFLINE``) or with the hub unreachable, a complete cached copy is returned with ``fetched``
    0. Raises BadRequest (a local path, not a diffusers repo, pickled weights only), ModelNotFound
    (offline and not cached, gated, private or missing, the download stopped), JobCancelled.
    """
    _check_hub_id(model_id, "download")
    cache_dir, endpoint = _cache_dir(cache_dir), _endpoint(endpoint)
    if _offline():
        return _from_cache_or_raise(model_id, cache_dir, revision, offline=True)
    fetch = dict(cache_dir=cache_dir, endpoint=endpoint, token=token)
    try:
        sizes, index_path, index_was_cached = _hub_listing(model_id, revision, fetch)
    except Exception as error:
        _raise_unless_unreachable(model_id, error)
        try:
            return _from_cache_or_raise(model_id, cache_dir, revision, offline=False)
        except ModelNotFound as not_cached:
            raise not_cached from error
    snapshot = os.path.dirname(index_path)
    model_index = _read_json(index_path) or {}
    files = select_engine_files(sizes, model_index, fp16, model_id)
    cached = {name for name in files if os.path.exists(os.path.join(snapshot, *name.split("/")))}
    tally = _Tally(model_id, sum(sizes[name] for name in files), sum(sizes[name] for name in cached), progress)
    tally.fetched = 0 if index_was_cached else sizes["model_index.json"]
    bar_class = _progress_bar_class(tally.add)
    for name in files:
        if name in cached:
            continue
        tally.current = name
        tally.report()
        before = tally.done
        _fetch_file(model_id, name, os.path.basename(snapshot), bar_class, fetch)
        if sizes[name]:
            tally.done = before + sizes[name]  # exact even if a retry re-sent bytes
    tally.current = None
    tally.report()
    _remove_stale_partial_files(cache_dir, model_id)
    return DownloadResult(model_id, snapshot, files, tally.total, tally.fetched, check_model_folder(snapshot).variant)


def _hub_listing(model_id: str, revision: str | None, fetch: dict) -> tuple[dict[str, int], str, bool]:
    """Ask the hub what ``model_id`` holds at ``revision`` and fetch its model_index.json: returns ({file
    name: size in bytes}, the cached model_index.json's path, whether it was cached already). ``fetch``: the
    cache_dir, endpoint and token. Raises BadRequest for a repo that is not a diffusers model, and the hub's
    or the network's own errors (``download_model`` words them)."""
    from huggingface_hub import HfApi, hf_hub_download, try_to_load_from_cache

    info = HfApi(endpoint=fetch["endpoint"], token=fetch["token"]).model_info(model_id, revision=revision,
                                                                             files_metadata=True)
    sizes = {sibling.rfilename: sibling.size or 0 for sibling in info.siblings or []}
    if "model_index.json" not in sizes:
        raise BadRequest(
            f"The hub repo {model_id} is not a diffusers model (it has no model_index.json); download its "
            ".safetensors checkpoint and give it to generate with --model PATH."
        )
    # model_index.json by branch name, so the cache records which commit the branch points to (refs/main),
    # which is how the engine finds the model offline; every other file by that commit, so all of them come
    # from one snapshot.
    index_was_cached = isinstance(try_to_load_from_cache(model_id, "model_index.json", cache_dir=fetch["cache_dir"],
                                                         revision=info.sha), str)
    return sizes, hf_hub_download(model_id, "model_index.json", revision=revision, **fetch), index_was_cached


def _remove_stale_partial_files(cache_dir: str, model_id: str) -> None:
    """Delete the ``*.incomplete`` blobs of a cache entry whose download has just completed, when no download
    holds them. huggingface_hub names them ``<etag>.<random>.incomplete``, so the partial file of a killed
    download is never reused or deleted by a later one, and ``list`` would count it for ever. A blob that
    another process is still writing is protected by huggingface_hub's lock ``.locks/<repo>/<etag>.lock``,
    which we try to take without waiting."""
    from filelock import FileLock, Timeout

    repo_folder = _repo_folder(cache_dir, model_id)
    blobs = os.path.join(repo_folder, "blobs")
    locks = os.path.join(cache_dir, ".locks", os.path.basename(repo_folder))
    for name in os.listdir(blobs) if os.path.isdir(blobs) else ():
        if not name.endswith(".incomplete"):
            continue
        os.makedirs(locks, exist_ok=True)
        try:
            with FileLock(os.path.join(locks, name.split(".")[0] + ".lock"), timeout=0):
                os.remove(os.path.join(blobs, name))
        except (Timeout, OSError):
            pass  # another download is writing it (or Windows keeps it open)


# --- remove ----------------------------------------------------------------------------------------


def remove_model(model_id: str, cache_dir: str | None = None) -> int:
    """Delete the hub model ``model_id``'s Hugging Face cache entry (every cached revision and any
    interrupted download) with huggingface_hub's cache deletion; returns the bytes freed.

    Never deletes a folder or file the user pointed at: a path is refused (BadRequest). Raises
    ModelNotFound when the cache holds no such model.
    """
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    _check_hub_id(model_id, "delete")
    cache_dir = _cache_dir(cache_dir)
    try:
        scan = scan_cache_dir(cache_dir)
    except (CacheNotFound, ValueError):
        scan = None
    repo = next((r for r in (scan.repos if scan else ()) if r.repo_type == "model" and r.repo_id == model_id), None)
    if repo is None or not repo.revisions:
        return _remove_unscannable(model_id, cache_dir)
    incomplete = sum(f.size_on_disk for f in scan.incomplete_files if repo.repo_path in f.file_path.parents)
    strategy = scan.delete_revisions(*(revision.commit_hash for revision in repo.revisions))
    strategy.execute()  # every revision: huggingface_hub deletes the whole entry, interrupted blobs included
    return strategy.expected_freed_size + incomplete


def _remove_unscannable(model_id: str, cache_dir: str) -> int:
    """A cache entry with no snapshot to delete (huggingface_hub's scan skips or cannot delete it, e.g. a
    download that stopped in its first file): delete the entry's folder, which only huggingface_hub writes.
    ModelNotFound when there is none."""
    folder = _repo_folder(cache_dir, model_id)
    if not os.path.isdir(folder):
        raise ModelNotFound(f"The model {model_id} is not in the Hugging Face cache ({cache_dir}); nothing was removed.")
    freed = _size_on_disk(folder)
    shutil.rmtree(folder)
    return freed


def human_size(size: int) -> str:
    """Bytes as a short text: ``5.2 GB``, ``350 kB``, ``12 B`` (decimal units, as the hub shows sizes)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            value = size / scale
            return f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{size} B"


def download_progress_event(job: str | None, model_id: str, bytes_done: int, bytes_total: int,
                            current_file: str | None) -> dict:
    """A protocol ``progress`` event for a download: stage ``downloading``, ``step`` and ``total`` in bytes
    (so ``step / total`` is the fraction done, as for every stage), plus ``model`` (the hub id) and ``file``
    (the repo file being fetched, null once done). Built on ``protocol.progress_event``; the protocol's
    STAGES and docs/protocol.md gain ``downloading`` with the protocol version bump."""
    from ..protocol import progress_event

    event = progress_event(job, "downloading", bytes_done, bytes_total)
    event.update(model=model_id, file=current_file)
    return event
