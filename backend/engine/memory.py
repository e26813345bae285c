"""Memory modes (``--memory auto|full|low``): what a job keeps on the device, and how it picks.

``full`` keeps the text encoder, the UNet and the VAE on the device for the whole job, runs the view batch
(below) per UNet call and decodes each tile in one ``vae.decode`` call.

``low`` trades time for memory and gives the same image (within float rounding):

- **Model offload**: on a GPU the models live in CPU memory and each stage moves only what it runs to the
  device (``StagePlacement``: the text encoder for the prompts, the UNet for denoising, the VAE for
  decoding). We move them ourselves rather than through accelerate's forward hooks: SyncDiffusion decodes
  with the VAE inside every denoising step, which hooks would answer by swapping the UNet out and back
  twice a step. On the CPU there is nothing to offload to.
- **View batch 1**: one view per UNet call. MAD (``--mad-steps``) is turned off: merged attention runs every
  view in one batch.
- **Strip decode**: each decode tile goes through the VAE's full-resolution layers in strips of rows
  (``decode.decode_in_strips``), which holds about half the memory of ``vae.decode``.
- **Half precision and attention** are the same in both modes: ``--dtype auto`` is already float16 on CUDA
  and MPS (on the CPU it stays float32: CPU half precision is slow and not within 2/255 of float32), and
  diffusers' attention already runs through PyTorch's scaled_dot_product_attention, whose flash and
  memory-efficient kernels never hold the full attention matrix.

``offload`` (chosen by ``auto`` on a GPU, never asked for by name) is the plan that fits a model whose weights
together do not leave room on the device, SDXL on an 8 GB card: the models move stage by stage as in ``low``
(the text encoders leave the device once the prompts are encoded; the VAE comes in to decode while the UNet
waits in CPU memory), but the view batch is still chosen from the free memory, MAD stays on, and the decode
runs in strips only when a whole tile would not fit.

**Text encoders on the CPU**: where the text encoders together do not fit on the device even alone (SD3's T5-XXL
encoder, 9.5 GB in float16, on an 8 GB card), the offload and low plans encode the prompts on the CPU and move
only the embeddings to the device (``MemoryPlan.text_on_cpu``): seconds once per job, against a model that could
not run at all. A model whose weights together do not fit on the device is loaded into CPU memory in the first
place (``loads_on_device``), so loading it cannot run out of device memory before the plan is made.

``auto`` estimates the activation memory of a ``full`` job (``estimate_full_bytes``; rough, from the
canvas, the views and the model's channels) and compares it with the device's free memory
(``free_memory_bytes``): ``full`` when it fits with ``HEADROOM`` to spare; else, on a GPU, ``offload`` when
each stage's models and activations fit (``plan_offload``: the device's free memory counts the weights the
offload moves out); else ``low``. metadata.json records the plan under "memory" (``MemoryPlan.to_dict``).
A job whose ``low`` stage does not fit the device (its largest model plus one view's activations) is refused
before it loads (``check_job_fits``).

**The view batch** (views per UNet call) is ``--view-batch`` when given, else chosen (``choose_view_batch``):
on a CUDA GPU the largest batch up to ``MAX_VIEW_BATCH`` whose ``full`` estimate fits in the free memory
(batching fills a GPU); on the CPU and MPS, or when the free memory is unknown, ``FIXED_VIEW_BATCH``;
1 with ``--memory low``.
"""

from __future__ import annotations

import dataclasses
import gc
from dataclasses import dataclass

import torch

from ..errors import BadRequest
from ..request import GenerateRequest
from .models import weighted_components

HEADROOM = 0.8
"""``auto`` picks ``full`` when the estimate is at most this fraction of the free memory."""

# Activation elements per pixel and per channel of the model's first block, measured on the CPU in float32
# with the Stable Diffusion 2 base architecture (benchmarks/bench_memory.py) and rounded up: one UNet sample
# at 64x64 latents held 51 per latent pixel and channel (254 MiB), a 384x512 px vae.decode 8.4 per image
# pixel and channel (803 MiB).
UNET_ELEMENTS_PER_PIXEL_CHANNEL = 64
DECODE_ELEMENTS_PER_PIXEL_CHANNEL = 10

FIXED_VIEW_BATCH = 4
"""The view batch where free memory does not choose one: the CPU and MPS (a batch there only lines the views up;
it was the fixed default before the choice existed, so CPU results are unchanged) and a GPU whose free memory is
unknown."""

MAX_VIEW_BATCH = 16
"""The largest view batch chosen on CUDA: 16 views are 32 UNet rows with classifier-free guidance, enough to keep
a large GPU busy; a larger batch adds memory for little speed, and leaves a longer last batch per step."""

HOST_BYTES_PER_IMAGE_PIXEL = 128
"""CPU memory a job holds per pixel of its image, whatever the model: the decoded canvas, its 8-bit and linear
copies, the HDR lighting's arrays and the cube map. Measured as the growth of the peak resident memory of
equirect jobs with HDR and cube map (the tiny test model, 1 step): 108 bytes per pixel from 2048x1024 to
4096x2048 px, 106 from 2048x1024 to 8192x4096 (4.0 GiB at its peak); rounded up."""


@dataclass
class MemoryPlan:
    """How a job uses memory. requested: auto, full or low (--memory); mode: full, offload or low, what runs;
    reason: why (one phrase); view_batch: views per UNet call; offload: models move between the CPU and
    the device stage by stage; strip_decode: decode tiles in strips of rows; free_bytes and
    estimated_full_bytes: what ``auto`` compared (None when not measured); view_batch_reason: why that view
    batch (one phrase, ``choose_view_batch``); text_on_cpu: the prompts are encoded on the CPU, the text
    encoders never move to the device (``text_encoders_fit``)."""

    requested: str
    mode: str
    reason: str
    view_batch: int
    offload: bool
    strip_decode: bool
    free_bytes: int | None = None
    estimated_full_bytes: int | None = None
    view_batch_reason: str = "asked for"
    text_on_cpu: bool = False

    def to_dict(self) -> dict:
        """The plan as metadata.json records it, sizes in MiB."""
        mib = 2**-20
        return {
            "requested": self.requested, "mode": self.mode, "reason": self.reason, "view_batch": self.view_batch,
            "view_batch_reason": self.view_batch_reason, "offload": self.offload, "strip_decode": self.strip_decode,
            "text_on_cpu": self.text_on_cpu,
            "free_mib": None if self.free_bytes is None else round(self.free_bytes * mib),
            "estimated_full_mib": None if self.estimated_full_bytes is None else round(self.estimated_full_bytes * mib),
        }


LOW_VIEW_BATCH_REASON = "low memory runs one view per UNet call"


def full_plan(request: GenerateRequest, reason: str, view_batch_reason: str = "asked for") -> MemoryPlan:
    """The ``full`` plan for ``request`` (its view batch decided: ``choose_view_batch``): that view batch, no
    offload, one-call decodes."""
    return MemoryPlan(request.memory, "full", reason, request.view_batch, offload=False, strip_decode=False,
                      view_batch_reason=view_batch_reason)


def low_plan(request: GenerateRequest, device: torch.device, reason: str, text_on_cpu: bool = False) -> MemoryPlan:
    """The ``low`` plan: view batch 1, offload when the device is not the CPU, strip decodes; the prompts encoded
    on the CPU with ``text_on_cpu`` (a GPU only)."""
    return MemoryPlan(request.memory, "low", reason, 1, offload=device.type != "cpu", strip_decode=True,
                      view_batch_reason=LOW_VIEW_BATCH_REASON, text_on_cpu=text_on_cpu and device.type != "cpu")


def text_encoders_fit(component_bytes: dict[str, int] | None, available_bytes: int | None) -> bool:
    """Whether the text encoders' weights in ``component_bytes`` ({component: bytes}, ``component_bytes``) fit
    together in ``available_bytes``, the device's memory with no model on it (True when either is unknown: the
    encoders then go where the other models go). Encoding holds a few prompts' activations beside them, which
    ``HEADROOM`` leaves room for."""
    if not component_bytes or available_bytes is None:
        return True
    text = sum(size for name, size in component_bytes.items() if name.startswith("text_encoder"))
    return text <= HEADROOM * available_bytes


def loads_on_device(memory_mode: str, device: torch.device, weights_bytes: int, free_bytes: int | None) -> bool:
    """Whether a model whose weights are ``weights_bytes`` (every component, in the job's dtype) is loaded straight
    onto ``device`` (else into CPU memory, for ``StagePlacement`` to move stage by stage): always on the CPU; on a
    GPU unless ``--memory low`` or the weights together exceed ``HEADROOM`` of its ``free_bytes`` (None: unknown,
    loaded onto it)."""
    if device.type == "cpu":
        return True
    return memory_mode != "low" and (free_bytes is None or weights_bytes <= HEADROOM * free_bytes)


def plan_memory(request: GenerateRequest, device: torch.device, dtype: torch.dtype, unet_config, vae_config,
                view_count: int, weights_bytes: int = 0, free_bytes: int | None = None,
                vae_dtype: torch.dtype | None = None, component_bytes: dict[str, int] | None = None) -> MemoryPlan:
    """The memory plan of ``request`` (validated, with its view set chosen) on ``device`` in ``dtype``
    (the VAE in ``vae_dtype``, default ``dtype``).

    The view batch is ``choose_view_batch``'s. For ``auto``: ``estimate_full_bytes`` of the job with that batch
    (``view_count`` views, the model's UNet and VAE configs) plus ``weights_bytes`` against ``free_bytes``
    (default: ``free_memory_bytes(device)`` now). ``weights_bytes`` are the weights a full job must still bring
    in (``weights_to_place``): on the CPU all of them (memory-mapped safetensors count as free page cache until
    first used), on a GPU those a low job left in CPU memory. When that does not fit on a GPU and
    ``component_bytes`` ({component: bytes of its weights}, ``component_bytes``) are given, ``plan_offload``
    tries the ``offload`` plan before falling back to ``low``.
    """
    if free_bytes is None and (request.memory != "low" or component_bytes):  # low needs it for text_on_cpu only
        free_bytes = free_memory_bytes(device)
    free = free_bytes
    # The device with no model on it: the weights it holds now are what a full job does not still bring in.
    empty = None if free is None or not component_bytes else free + sum(component_bytes.values()) - weights_bytes
    text_on_cpu = device.type != "cpu" and not text_encoders_fit(component_bytes, empty)
    if request.memory == "low":
        return low_plan(request, device, "asked for", text_on_cpu)
    view_batch, view_batch_reason = choose_view_batch(request, device.type, free, dtype, unet_config, vae_config,
                                                      view_count, weights_bytes, vae_dtype)
    asked, request = request, dataclasses.replace(request, view_batch=view_batch)
    estimate = estimate_full_bytes(request, dtype, unet_config, vae_config, view_count, vae_dtype) + weights_bytes
    offload = None
    if request.memory == "auto" and free is not None and estimate > HEADROOM * free and component_bytes \
            and device.type != "cpu":
        offload = plan_offload(asked, dtype, unet_config, vae_config, view_count, component_bytes, empty, vae_dtype)
    if request.memory == "full":
        plan = full_plan(request, "asked for", view_batch_reason)
    elif free is None:
        plan = full_plan(request, f"the free memory of the {device.type} device is unknown", view_batch_reason)
    elif estimate <= HEADROOM * free:
        plan = full_plan(request, "the job fits in the free memory", view_batch_reason)
    elif offload is not None:
        plan = offload
    else:
        plan = low_plan(request, device, "the job would not fit in the free memory", text_on_cpu)
    plan.free_bytes, plan.estimated_full_bytes = free, estimate
    return plan


def plan_offload(request: GenerateRequest, dtype: torch.dtype, unet_config, vae_config, view_count: int,
                 component_bytes: dict[str, int], available_bytes: int,
                 vae_dtype: torch.dtype | None = None) -> MemoryPlan | None:
    """The ``offload`` plan of ``request`` (validated; ``request.view_batch`` None or asked for) on a GPU with
    ``available_bytes`` for the job once no model is on it (its free memory plus the weights now on it), or None
    when a stage does not fit: the models move stage by stage (``StagePlacement``: the text encoders, left on
    the CPU (``text_on_cpu``) where they do not fit (``text_encoders_fit``); then the UNet (and the VAE while
    SyncDiffusion decodes with it); then the VAE), so each stage needs its own models' ``component_bytes`` plus
    its activations (``estimate_activation_bytes``), those at most ``HEADROOM`` of what the weights leave (the
    weights' sizes are exact, the activations' a rough estimate). The view batch: the largest up to ``MAX_VIEW_BATCH`` (or the one asked for) whose denoising stage fits; decode tiles
    in strips when a whole tile would not fit."""
    vae = component_bytes.get("vae", 0)
    denoising = denoiser_weight_bytes(component_bytes) + (vae if request.sync == "syncdiffusion" else 0)

    def fits(weights: int, activations: int) -> bool:
        # The weights' sizes are exact (their tensors), the activations a rough estimate: the headroom is theirs.
        return activations <= HEADROOM * (available_bytes - weights)

    text_on_cpu = not text_encoders_fit(component_bytes, available_bytes)
    if request.view_batch is not None:
        batches, batch_reason = [request.view_batch], "asked for"
    else:
        batches = range(max(1, min(MAX_VIEW_BATCH, view_count)), 0, -1)
        batch_reason = f"the largest batch (at most {MAX_VIEW_BATCH}) whose denoising stage fits with the models offloaded"
    for batch in batches:
        sized = dataclasses.replace(request, view_batch=batch)
        unet, decode = estimate_activation_bytes(sized, dtype, unet_config, vae_config, view_count, vae_dtype)
        if fits(denoising, unet):
            break
    else:
        return None
    strip_decode = not fits(vae, decode)
    if strip_decode and not fits(vae, decode // 2):
        return None
    reason = "the job fits in the free memory with each stage's models alone on the device"
    return MemoryPlan(request.memory, "offload", reason, batch, offload=True, strip_decode=strip_decode,
                      view_batch_reason=batch_reason, text_on_cpu=text_on_cpu)


def choose_view_batch(request: GenerateRequest, device_type: str, free_bytes: int | None, dtype: torch.dtype,
                      unet_config, vae_config, view_count: int, weights_bytes: int = 0,
                      vae_dtype: torch.dtype | None = None) -> tuple[int, str]:
    """(views per UNet call, why: one phrase) for ``request`` (validated) on a device of type ``device_type``
    ("cuda", "mps", "cpu") with ``free_bytes`` free (None: unknown), in ``dtype`` (the VAE in ``vae_dtype``).

    ``--memory low``: 1. An explicit ``--view-batch``: that. Otherwise, on CUDA with the free memory known: the
    largest batch up to ``MAX_VIEW_BATCH`` and ``view_count`` (the most views a step runs) whose
    ``estimate_full_bytes`` plus ``weights_bytes`` is at most ``HEADROOM`` of ``free_bytes``, or 1 when none fits
    (``auto`` then plans ``low``); on the CPU, MPS or with the free memory unknown: ``FIXED_VIEW_BATCH``. A pure
    function of its arguments: the caller measures the free memory."""
    if request.memory == "low":
        return 1, LOW_VIEW_BATCH_REASON
    if request.view_batch is not None:
        return request.view_batch, "asked for"
    if device_type != "cuda":
        # On the CPU a batch only lines views up for the same arithmetic, so CPU images stay as they were with the
        # fixed batch; MPS (untested here) keeps it too rather than trust an untested choice.
        return FIXED_VIEW_BATCH, f"the fixed batch on the {device_type} device"
    if free_bytes is None:
        return FIXED_VIEW_BATCH, "the fixed batch: the free memory of the device is unknown"
    for batch in range(max(1, min(MAX_VIEW_BATCH, view_count)), 0, -1):
        need = estimate_full_bytes(dataclasses.replace(request, view_batch=batch), dtype, unet_config, vae_config,
                                   view_count, vae_dtype) + weights_bytes
        if need <= HEADROOM * free_bytes:
            return batch, f"the largest batch (at most {MAX_VIEW_BATCH}) whose estimate fits in the free memory"
    return 1, "not even one view's estimate fits in the free memory"


def estimate_full_bytes(request: GenerateRequest, dtype: torch.dtype, unet_config, vae_config, view_count: int,
                        vae_dtype: torch.dtype | None = None) -> int:
    """A rough upper estimate, in bytes, of the activation memory of ``request`` in ``full`` mode: the larger
    of a UNet call and the largest decode tile (``estimate_activation_bytes``). ``request.view_batch`` must be
    decided (``choose_view_batch``); None raises ValueError."""
    return int(max(estimate_activation_bytes(request, dtype, unet_config, vae_config, view_count, vae_dtype)))


def estimate_activation_bytes(request: GenerateRequest, dtype: torch.dtype, unet_config, vae_config, view_count: int,
                              vae_dtype: torch.dtype | None = None) -> tuple[int, int]:
    """(UNet, decode): rough upper estimates, in bytes, of the activations of ``request``'s denoising stage and
    of its decoding stage. UNet: a call with ``view_batch`` views (twice with guidance; every view while MAD
    merges them; three times that for SyncDiffusion's gradient pass), in ``dtype``. Decode: the largest decode
    tile (``decode.decode_canvas``'s default tiling) in one ``vae.decode``, in ``vae_dtype`` (default ``dtype``);
    about half of it in strips. unet_config / vae_config: the model's configs (dicts or diffusers configs).
    ``request.view_batch`` must be decided (``choose_view_batch``); None raises ValueError."""
    from .decode import largest_decode_tile

    if request.view_batch is None:
        raise ValueError("estimate_full_bytes needs a decided view batch; choose_view_batch decides it.")

    element = torch.finfo(dtype).bits // 8
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    window = request.window or unet_config["sample_size"]
    views = view_count if request.mad_steps else min(request.view_batch, view_count)
    samples = views * (2 if request.guidance > 1.0 else 1)
    unet = samples * window * window * unet_config["block_out_channels"][0] * UNET_ELEMENTS_PER_PIXEL_CHANNEL * element
    if request.sync == "syncdiffusion":
        unet *= 3
    tile_height, tile_width = largest_decode_tile(request.height // factor, request.width // factor, request.layout)
    vae_element = torch.finfo(vae_dtype or dtype).bits // 8
    decode = (tile_height * factor) * (tile_width * factor) * vae_config["block_out_channels"][0] * DECODE_ELEMENTS_PER_PIXEL_CHANNEL * vae_element
    return int(unet), int(decode)


def check_job_fits(request: GenerateRequest, device: torch.device, dtype: torch.dtype, unet_config, vae_config,
                   weights_bytes: int, free_host_bytes: int | None = None, free_device_bytes: int | None = None,
                   largest_model_bytes: int = 0) -> None:
    """Refuse, before anything loads, a job that cannot fit in memory in any mode, rather than let it run into
    the out-of-memory killer hours later. ``request``: validated and sized for the model; ``weights_bytes``: the
    model's weight files (``models.weights_file_bytes``); the free bytes default to ``free_memory_bytes`` now.

    The CPU memory a job needs is its image (``HOST_BYTES_PER_IMAGE_PIXEL`` per pixel), the weights, and on a CPU
    device the activations of ``--memory low`` (one view per UNet call); on a GPU those activations must fit
    in the device's free memory, with the largest model a ``low`` stage holds there (``largest_model_bytes``: the
    UNet's weights in the job's dtype, ``models.component_weight_bytes``; 0 when unknown). A ``--memory full`` job on the CPU is checked with its own view batch and told
    to pass ``--memory low`` when that would fit. Raises BadRequest with one sentence naming the largest size
    that fits; returns None when the job fits or a free size is unknown."""
    host_free = free_memory_bytes(torch.device("cpu")) if free_host_bytes is None else free_host_bytes
    low = dataclasses.replace(request, view_batch=1, mad_steps=0)
    low_activations = estimate_full_bytes(low, dtype, unet_config, vae_config, view_count=1)
    fixed = weights_bytes + (low_activations if device.type == "cpu" else 0)
    host_need = fixed + request.width * request.height * HOST_BYTES_PER_IMAGE_PIXEL
    if host_free is not None and host_need > host_free:
        raise BadRequest(_too_large_message(request, host_need, host_free, fixed))
    if device.type == "cpu" and request.memory == "full" and host_free is not None:
        # The views are not built yet: count as many as the batch, which then runs whole.
        view_batch, _ = choose_view_batch(request, device.type, host_free, dtype, unet_config, vae_config, MAX_VIEW_BATCH)
        full = estimate_full_bytes(dataclasses.replace(request, view_batch=view_batch), dtype, unet_config, vae_config,
                                   view_count=view_batch)
        if host_need - low_activations + full > host_free:
            raise BadRequest(f"A {request.width}x{request.height} px job with --memory full needs about "
                             f"{_gib(host_need - low_activations + full)} of memory, but this machine has "
                             f"{_gib(host_free)} free; pass --memory low (or auto), which fits.")
    device_free = free_memory_bytes(device) if free_device_bytes is None and device.type != "cpu" else free_device_bytes
    # ``low`` on a GPU: the UNet alone with one view's activations, then the VAE alone decoding in strips.
    one_view, tile = estimate_activation_bytes(low, dtype, unet_config, vae_config, view_count=1)
    device_need = max(largest_model_bytes + one_view, tile // 2)
    if device.type != "cpu" and device_free is not None and device_need > device_free:
        if largest_model_bytes + one_view >= tile // 2:
            parts = (f"{_gib(largest_model_bytes)} for the denoising model's weights and " if largest_model_bytes else "") + \
                f"{_gib(one_view)} for one view"
        else:
            parts = "to decode a tile in strips"
        raise BadRequest(f"A {request.width}x{request.height} px job needs about {_gib(device_need)} on the "
                         f"{device} device even with --memory low ({parts}), but it has {_gib(device_free)} free; "
                         "lower --width and --height or --window, use --device cpu, or free the device.")


def _too_large_message(request: GenerateRequest, need: int, free: int, fixed: int) -> str:
    # The largest canvas of the same aspect whose pixels fit in what the fixed part leaves, in steps of 64 px.
    pixels = max(0, free - fixed) / HOST_BYTES_PER_IMAGE_PIXEL
    aspect = request.width / request.height
    width = int((pixels * aspect) ** 0.5) // 64 * 64
    height = int(width / aspect) // 8 * 8
    largest = (f"the largest {request.layout} size that fits is about {width}x{height} px" if height >= 64
               else "no canvas of this shape fits; close other programs or use a machine with more memory")
    return (f"A {request.width}x{request.height} px {request.layout} job needs about {_gib(need)} of memory, but "
            f"this machine has {_gib(free)} free; {largest}.")


def _gib(size: int) -> str:
    return f"{size / 2**30:.1f} GiB"


def weights_to_place(pipeline, device: torch.device) -> int:
    """Bytes of the pipeline's text encoders', UNet's and VAE's weights (``models.weighted_components``) that a
    ``full`` job on ``device`` must still make resident: all of them on the CPU, else those not on ``device`` now
    (a ``low`` job left them in CPU memory)."""
    return sum(tensor_bytes(parameter) for module in weighted_components(pipeline).values()
               for parameter in module.parameters()
               if device.type == "cpu" or parameter.device.type != device.type)


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes ``tensor`` (a weight) holds: its elements times their size; for a tensor subclass that keeps its values
    in inner tensors (torchao's int8 weights: int8 values, a scale and a zero point per row; ``--quantize``), the
    sum of those, as its nominal dtype would overstate them."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def denoiser_weight_bytes(sizes: dict[str, int]) -> int:
    """The denoising model's bytes in ``sizes`` ({component: bytes}, ``component_bytes`` or
    ``models.component_weight_bytes``): the UNet's, or an SD3 transformer's; 0 when neither is known."""
    return sizes.get("unet", sizes.get("transformer", 0))


def component_bytes(pipeline) -> dict[str, int]:
    """{component: bytes of its weights as loaded} of the pipeline's ``models.weighted_components``."""
    return {name: sum(tensor_bytes(parameter) for parameter in module.parameters())
            for name, module in weighted_components(pipeline).items()}


def free_memory_bytes(device: torch.device) -> int | None:
    """Bytes the job can still allocate on ``device``: CUDA's free memory plus what PyTorch has cached but
    not used; on MPS the recommended working set less what the driver holds; on the CPU the kernel's
    MemAvailable. None when the platform does not say."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "mps":
        return max(0, torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil
    except ImportError:
        return None
    return psutil.virtual_memory().available


def memory_attempts(request: GenerateRequest, plan: MemoryPlan, device: torch.device) -> list[tuple[str, MemoryPlan]]:
    """The attempts a job makes when the device runs out of memory, in order, as (name, memory plan): "full",
    "offload" or "low", the ``plan`` as given; after a full or offload plan with a view batch above 1, "half view
    batch"; after a full or offload plan, "low" (``low_plan``: view batch 1, MAD off, as merged attention runs every view in one UNet
    batch). Each attempt runs ``request`` from the same seed (``resolve.for_memory_plan``)."""
    attempts = [(plan.mode, plan)]
    if plan.mode != "low" and plan.view_batch > 1:
        attempts.append(("half view batch", dataclasses.replace(plan, view_batch=max(1, plan.view_batch // 2),
                                                                reason="out of memory",
                                                                view_batch_reason="half the batch that ran out of memory")))
    if plan.mode != "low":
        low = low_plan(request, device, "out of memory", plan.text_on_cpu)
        attempts.append(("low", dataclasses.replace(low, free_bytes=plan.free_bytes,
                                                    estimated_full_bytes=plan.estimated_full_bytes)))
    return attempts


def is_out_of_memory(error: BaseException, device: torch.device) -> bool:
    """Whether ``error`` is ``device`` running out of memory: torch.OutOfMemoryError (CUDA and the CPU
    allocator), or on Apple's MPS the plain RuntimeError whose message says "out of memory"."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return device.type == "mps" and type(error) is RuntimeError and "out of memory" in str(error).lower()


def release_memory(device: torch.device) -> None:
    """Free what a failed attempt held: collect its reference cycles, then return the device's cached
    blocks to the driver so the next attempt can allocate them."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


def out_of_memory_message(request: GenerateRequest, device: torch.device, dtype: torch.dtype) -> str:
    """The one sentence of the OutOfMemory a job raises after its last attempt (``request``, the parameters
    it ran with on ``device`` in ``dtype``) failed too."""
    advice = "lower the canvas size (--width, --height) or --window"
    if device.type != "cpu" and dtype != torch.float16:
        advice += ", or use --dtype float16"
    if request.sync == "syncdiffusion":
        advice += ", or add --sync-checkpointing or --sync-decoder taesd for SyncDiffusion's gradient pass"
    return (f"The {device} device ran out of memory even with --view-batch {request.view_batch} "
            f"and MAD off; {advice}.")


class StagePlacement:
    """Where the pipeline's models sit during each stage of a job.

    Without offload every model stays on ``device``. With offload (``--memory low`` or the ``offload`` plan on a GPU), ``enter(stage)``
    moves the models ``stage`` runs to ``device`` and the others to the CPU first, so the device holds one
    model at a time: "text" the text encoders (SDXL has two, SD3 three), "denoise" the UNet (SD3: transformer) (and the VAE when SyncDiffusion
    decodes with it), "decode" the VAE. ``enter`` with offload off puts every model back on the device, so a model
    cached by the server serves a ``full`` job after a ``low`` one. With ``text_on_cpu`` (a plan's, with offload)
    the text encoders stay on ``offload_device`` in every stage and the prompts are encoded there: ``text_device``.
    """

    def __init__(self, pipeline, device: torch.device, offload: bool, vae_while_denoising: bool = False,
                 offload_device: torch.device = torch.device("cpu"), text_on_cpu: bool = False):
        self.pipeline = pipeline
        self.device = device
        self.offload = offload
        self.offload_device = offload_device  # where offloaded models wait
        self.text_on_cpu = text_on_cpu and offload
        self.text_device = offload_device if self.text_on_cpu else device  # where the prompts are encoded
        denoiser = ("unet", "transformer")  # whichever the pipeline has (SD3: the transformer)
        text = () if self.text_on_cpu else ("text_encoder", "text_encoder_2", "text_encoder_3")
        self.needs = {"text": text, "denoise": denoiser + ("vae",) if vae_while_denoising else denoiser,
                      "decode": ("vae",)}

    def enter(self, stage: str) -> None:
        """Put the models of ``stage`` ("text", "denoise" or "decode") on the device; with offload, the rest on the CPU."""
        wanted = self.needs[stage]
        components = weighted_components(self.pipeline)
        # Offload first, so the device never holds the old stage's models and the new ones together.
        for name in sorted(components, key=lambda name: name in wanted):
            # Always .to(): it is free for tensors already there, and finishes a move an earlier OOM cut short.
            components[name].to(self.device if name in wanted or not self.offload else self.offload_device)
        if self.offload and self.device.type == "cuda":
            torch.cuda.empty_cache()  # return the offloaded models' blocks to the driver
        elif self.offload and self.device.type == "mps":
            torch.mps.empty_cache()

