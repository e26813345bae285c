"""MAD, Merge-Attend-Diffuse (Quattrini et al.): attention layers that see the whole canvas, not one view.

For the first τ denoising steps, each attention layer of the selected UNet blocks (down, mid, up) runs
on the canvas instead of on each view: the views' input features are merged onto the canvas at that
layer's feature resolution (overlaps averaged), the layer attends there (self-attention among all canvas
tokens; cross-attention of every canvas token to the prompt), and the result is split back into the views.
Convolutions and everything outside the attention layers still run per view, so the views keep their own
detail while attention ties their content together. After τ steps the layers run per view again, exactly
as before (the original processors do the work).

Merge and split are ``CanvasViews.fuse`` and ``CanvasViews.read`` at the feature resolution
(``CanvasViews.at_resolution``), so one mechanism serves every view set:

- crop windows put their features back where they read them and read them back exactly; wrapping in
  longitude (equirect) and in both axes (tile) comes with the windows. This is the paper's operator.
- projected views (cube faces, the ring, the pole faces of ``band+poles``) are merged through the same
  sphere correspondences that fuse their latents: fuse averages, at each canvas pixel, every view's
  feature sampled bilinearly where that pixel's direction falls on the view (a back-warp), and read
  samples the canvas bilinearly through the view's grid. So a cube face attends to the sky the band
  sees, and its features come back as a resampling of the canvas. The two resamplings blur the features
  of projected views slightly; crop windows are exact. Using the correspondences the loop already has
  (rather than a second, attention-specific geometry) keeps the canvas the single place views meet.

Our processor is one object per attention layer, installed on the selected blocks only (the published
code shares one processor across the UNet, so choosing blocks there changes nothing). Cross-attention is
merged only when every view of a CFG branch has the same prompt; with per-view prompts (``--prompt-up``,
``--prompt-down``) each view attends to its own prompt unmerged, while self-attention is still merged.
A batch merges only the views it holds: the loop predicts every view in one batch while MAD is active,
but SyncDiffusion's gradient pass predicts chunks, which merge among themselves and attend only to the
canvas pixels they see. A layer's own residual connection (none in SD's transformer blocks, whose
residual is outside the layer and stays per view) adds each view's own input.

**Diffusion transformers (SD3's MMDiT).** Every ``transformer_blocks[i]`` runs joint attention
(``JointAttnProcessor2_0``): a view's image tokens (its latents in p x p patches, a (s/p)² row-major grid) and the
prompt's context tokens attend in one softmax. MAD merges the layer's input image tokens, as for a UNet, at
patch resolution (``CanvasViews.at_resolution(p)``: crop windows start at multiples of p), averages the views'
context tokens of each CFG branch into one set, runs the layer's own processor once per branch on (canvas
tokens, that context), splits the image tokens back into the views and gives every view the same context
output. Merging the input rather than the queries, keys and values is mad.py's form for UNets too; the
projections are affine and the merge a convex average, so they commute with it, while the q/k norms of SD3.5
act on the merged projections as they would on a whole image; and it is one tensor to merge instead of three.
The image tokens keep their positions: SD3 adds its positional embedding in ``PatchEmbed``, per view, before the
blocks. The context averaging is exact where the views' context streams are equal (merging from the first
block on: every block merged returns one context output to all views); where unmerged blocks came before, each
view's context stream has taken up its own image, and the average merges those as overlaps are merged. The
joint softmax cannot merge self-attention while keeping each view's text apart, so views with different prompts
are not merged in a transformer (the layer runs per view); the request is refused before that
(``resolve.resolve_request``). ``--mad-blocks`` names thirds of the block list for a transformer
(``transformer_block_groups``): down the first third, mid the second, up the last.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ...request import MAD_BLOCKS, parse_mad_blocks
from ...sphere.view_sets import CanvasViews

BLOCKS = MAD_BLOCKS
"""The UNet block groups MAD can act on, in the names ``--mad-blocks`` takes (``request.MAD_BLOCKS``)."""

_BLOCK_PREFIX = {"down": "down_blocks.", "mid": "mid_block.", "up": "up_blocks."}


def patch_size(model) -> int | None:
    """The patch size of a diffusion transformer (``model``: the model, or its config as a dict or diffusers config;
    SD3's 2), None for a UNet."""
    config = model.config if isinstance(model, torch.nn.Module) else model
    return config.get("patch_size") if config is not None else None


def transformer_block_groups(num_layers: int) -> dict[str, range]:
    """The indices of ``transformer_blocks`` that ``--mad-blocks`` names in a transformer of ``num_layers`` blocks:
    down the first third, mid the second, up the last (block i in group 3 i // num_layers; with fewer than three
    blocks a group may be empty: 2 blocks give down [0], mid [1], up none)."""
    groups = {name: [] for name in BLOCKS}
    for index in range(num_layers):
        groups[BLOCKS[3 * index // num_layers]].append(index)
    return {name: range(indices[0], indices[-1] + 1) if indices else range(0) for name, indices in groups.items()}


def _transformer_layers(config) -> int:
    """How many blocks a transformer (``config``: its config, or the model) has."""
    if isinstance(config, torch.nn.Module):
        return len(config.transformer_blocks)
    return int(config["num_layers"])


def attention_layers(unet, blocks=BLOCKS) -> dict[str, torch.nn.Module]:
    """The attention modules of the selected blocks of ``unet`` (a UNet, or a diffusion transformer whose groups are
    ``transformer_block_groups``): {module name (as in ``unet.named_modules``): module}, every module that holds a
    processor (diffusers ``Attention``: a UNet's attn1, attn2; a transformer block's attn and SD3.5's attn2)."""
    selected = parse_mad_blocks(blocks)
    if patch_size(unet):
        groups = transformer_block_groups(_transformer_layers(unet))
        prefixes = tuple(f"transformer_blocks.{index}." for name in selected for index in groups[name])
    else:
        prefixes = tuple(_BLOCK_PREFIX[name] for name in selected)
    return {name: module for name, module in unet.named_modules()
            if name.startswith(prefixes) and hasattr(module, "set_processor") and hasattr(module, "processor")}


def block_divisors(unet, blocks=BLOCKS) -> dict[str, int]:
    """How many times smaller than the latents the features are in each selected block with attention.

    unet: a diffusers ``UNet2DConditionModel``, or its config (a mapping with ``down_block_types``,
    ``up_block_types`` and ``mid_block_type``, so a request can be checked before the weights load).
    Returns {block group name + index ("down1", "mid", "up0", ...): divisor}. Every down block except the
    last halves the resolution (it has a downsampler), the mid block works at the smallest resolution,
    and every up block except the last doubles it again. A diffusion transformer (``unet`` a transformer or its
    config, with ``patch_size`` p): {group name: p} for each selected group that has blocks
    (``transformer_block_groups``): every block attends on the grid of p x p patches.
    """
    selected = parse_mad_blocks(blocks)
    patch = patch_size(unet)
    if patch:
        groups = transformer_block_groups(_transformer_layers(unet))
        return {name: int(patch) for name in selected if len(groups[name])}
    if hasattr(unet, "down_blocks"):
        down, mid, up = list(unet.down_blocks), unet.mid_block, list(unet.up_blocks)
    else:
        down, mid, up = unet["down_block_types"], unet.get("mid_block_type", "UNetMidBlock2DCrossAttn"), unet["up_block_types"]
    levels = len(down) - 1
    named = [(f"down{index}", block, 2**index) for index, block in enumerate(down)]
    named += [("mid", mid, 2**levels)] + [(f"up{index}", block, 2 ** (levels - index)) for index, block in enumerate(up)]
    return {name: divisor for name, block, divisor in named
            if name.rstrip("0123456789") in selected and _has_attention(block)}


def _has_attention(block) -> bool:
    """Whether a UNet block (a module, or its type name in a config) has attention layers."""
    if block is None:
        return False
    if isinstance(block, str):  # CrossAttnDownBlock2D, AttnUpBlock2D, UNetMidBlock2DCrossAttn, ...
        return "Attn" in block
    return any(hasattr(module, "set_processor") for module in block.modules())


def check_mad(unet, views: CanvasViews, blocks=BLOCKS) -> dict[int, CanvasViews]:
    """Check that ``views`` can be merged at the feature resolution of every selected block of ``unet``.

    Returns {divisor: the views at that resolution} (``CanvasViews.at_resolution``). Raises ValueError
    with one sentence, naming the block and what to change, when the canvas, the window or a window
    position is not a multiple of a block's divisor.
    """
    feature_views = {}
    network = "transformer" if patch_size(unet) else "UNet"
    for block, divisor in block_divisors(unet, blocks).items():
        if divisor not in feature_views:
            feature_views[divisor] = _at_resolution(views, divisor, f"the {network}'s {block} block")
    return feature_views


def _at_resolution(views: CanvasViews, divisor: int, where: str) -> CanvasViews:
    """``views.at_resolution(divisor)``, raising ValueError with one sentence saying what does not divide
    and pointing at ``--mad-blocks``."""
    try:
        return views.at_resolution(divisor)
    except ValueError:
        canvas = views.canvas
        if canvas.height % divisor or canvas.width % divisor:
            reason = f"the canvas ({canvas.height}x{canvas.width} latents) is not a multiple of {divisor}"
        elif views.size % divisor:
            reason = f"the {views.size}-latent --window is not a multiple of {divisor}"
        else:
            crop = next(crop for crop in views.crops if crop.top % divisor or crop.left % divisor)
            reason = (f"a crop window starts at latent row {crop.top}, column {crop.left}, not multiples of {divisor} "
                      "(--stride sets them, and in band+poles the latitude limit sets the first row)")
        raise ValueError(f"MAD cannot merge these views in {where}, whose features are {divisor}x smaller than the "
                         f"latents: {reason}; change that, or leave that block out of --mad-blocks.") from None


def merge_views(feature_views: CanvasViews, tokens: torch.Tensor, branches: int) -> torch.Tensor:
    """Merge view features onto the canvas: the paper's MERGE at one feature resolution.

    tokens: (n * branches, side * side, dim), the n views of ``feature_views`` (in its order) interleaved
    per view ([view 0 branch 0, view 0 branch 1, view 1 branch 0, ...]), each a row-major side x side map.
    Returns (branches, H * W, dim): each branch's canvas H x W (row-major), overlaps averaged.
    """
    count, length, dim = tokens.shape
    side = math.isqrt(length)
    maps = tokens.reshape(count // branches, branches, side, side, dim).permute(0, 1, 4, 2, 3)
    canvas = feature_views.fuse(maps.reshape(count // branches, branches * dim, side, side))
    return canvas.reshape(branches, dim, -1).transpose(1, 2)


def split_canvas(feature_views: CanvasViews, canvas_tokens: torch.Tensor) -> torch.Tensor:
    """Split canvas features back into the views: the paper's SPLIT, inverse layout of ``merge_views``.

    canvas_tokens: (branches, H * W, dim). Returns (n * branches, side * side, dim), interleaved per view.
    """
    branches, _, dim = canvas_tokens.shape
    canvas = feature_views.canvas
    maps = canvas_tokens.transpose(1, 2).reshape(1, branches * dim, canvas.height, canvas.width)
    views = feature_views.read(maps)  # (n, branches * dim, side, side)
    count, side = views.shape[0], views.shape[-1]
    return views.reshape(count, branches, dim, side * side).transpose(2, 3).reshape(count * branches, side * side, dim)


def attend(attn, hidden_states: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
    """The layer's attention on tokens, as diffusers' ``AttnProcessor2_0`` computes it without its residual.

    attn: the diffusers ``Attention`` module (its group norm, to_q/to_k/to_v, heads, q/k norms, to_out).
    hidden_states: (b, tokens, dim); context: (b, L, D) for cross-attention, None for self-attention.
    Returns (b, tokens, out_dim). On CUDA ``scaled_dot_product_attention`` runs flash or memory-efficient
    kernels that never hold the tokens x tokens matrix, which is what lets a whole canvas fit.
    """
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = attn.to_q(hidden_states)
    if context is None:
        context = hidden_states
    elif attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    key, value = attn.to_k(context), attn.to_v(context)
    batch, head_dim = hidden_states.shape[0], key.shape[-1] // attn.heads
    query, key, value = (tensor.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for tensor in (query, key, value))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False, scale=attn.scale)
    out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
    return attn.to_out[1](attn.to_out[0](out))


class MergedAttentionProcessor:
    """The processor of one attention layer: merged attention while MAD is active, else the original.

    ``owner``: the ``MergedAttention`` that knows the step and the batch's views; ``name``: the layer's
    module name in the UNet; ``original``: the processor it replaces (it does the work whenever MAD is
    inactive, the batch's views are unknown, the call has an attention mask or spatial norm, or a
    cross-attention's views have different prompts, so those calls are the original's bit for bit).
    ``merged_calls`` counts the calls that merged.
    """

    def __init__(self, owner: "MergedAttention", name: str, original):
        self.owner = owner
        self.original = original
        self.merged_calls = 0
        self._original_takes = set(inspect.signature(original.__call__).parameters)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        views = self.owner.batch_views
        merging = (self.owner.active and views is not None and attention_mask is None and attn.spatial_norm is None
                   and not kwargs)
        if merging and hidden_states.shape[0] % len(views):
            raise RuntimeError(f"MAD: a batch of {hidden_states.shape[0]} rows cannot hold the {len(views)} views "
                               "it was given.")
        if self.owner.joint:  # a transformer's joint attention: merged only when the batch's prompts are one
            merging = merging and self.owner.batch_shares_prompt
        if not (merging and (self.owner.joint or self.owner.shares_context(encoder_hidden_states, len(views)))):
            extra = {"temb": temb} if temb is not None and "temb" in self._original_takes else {}
            return self.original(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                                 attention_mask=attention_mask, **extra, **kwargs)
        if self.owner.joint:
            return self._merged_joint_attention(attn, hidden_states, encoder_hidden_states, views)
        tokens = hidden_states.flatten(2).transpose(1, 2) if hidden_states.ndim == 4 else hidden_states
        self.merged_calls += 1
        branches = tokens.shape[0] // len(views)
        merge = self.owner.merge_plan(views, tokens.shape[1], tokens.device)
        if merge.order is not None:  # CanvasViews numbers views ascending: bring the batch's rows into that order
            tokens = tokens.unflatten(0, (len(views), branches))[merge.order].flatten(0, 1)
        canvas = merge_views(merge.views, tokens, branches)
        context = encoder_hidden_states[:branches] if encoder_hidden_states is not None else None
        if merge.seen is None:
            canvas = attend(attn, canvas, context)
        else:  # a subset of the views: attend among the canvas pixels they see, not the empty rest
            attended = attend(attn, canvas[:, merge.seen], context)
            canvas = canvas.new_zeros(*canvas.shape[:2], attended.shape[-1]).index_copy_(1, merge.seen, attended)
        out = split_canvas(merge.views, canvas)
        if merge.order is not None:
            out = out.unflatten(0, (len(views), branches))[merge.inverse].flatten(0, 1)
        if hidden_states.ndim == 4:
            out = out.transpose(1, 2).reshape(hidden_states.shape[0], -1, *hidden_states.shape[2:])
        if attn.residual_connection:
            out = out + hidden_states  # each view keeps its own residual, as a transformer block's outer one
        return out / attn.rescale_output_factor

    def _merged_joint_attention(self, attn, hidden_states: torch.Tensor, context: torch.Tensor | None,
                                views: tuple[int, ...]):
        """Joint attention (a transformer block's; module docstring) on the canvas: the views' image tokens
        ``hidden_states`` (n * branches, (s/p)², dim) merged, their context tokens ``context`` (n * branches, L, dim;
        None for SD3.5's image-only attn2) averaged per branch, the original processor run once on (canvas,
        context) with one row per branch, and split back. Returns what the original returns for the batch: the
        image tokens (n * branches, (s/p)², dim), and with a context the context output, the same for every view
        of a branch (n * branches, L, dim)."""
        self.merged_calls += 1
        count = len(views)
        branches = hidden_states.shape[0] // count
        merge = self.owner.merge_plan(views, hidden_states.shape[1], hidden_states.device)
        tokens = hidden_states
        if merge.order is not None:
            tokens = tokens.unflatten(0, (count, branches))[merge.order].flatten(0, 1)
        canvas = merge_views(merge.views, tokens, branches)
        if merge.seen is not None:  # a subset of the views: attend among the canvas tokens they see
            canvas = canvas[:, merge.seen]
        shared = None if context is None else context.unflatten(0, (count, branches)).mean(0)
        attended = self.original(attn, canvas, encoder_hidden_states=shared)
        image, context_out = attended if shared is not None else (attended, None)
        if merge.seen is not None:
            whole = image.new_zeros(branches, merge.views.canvas.height * merge.views.canvas.width, image.shape[-1])
            image = whole.index_copy_(1, merge.seen, image)
        out = split_canvas(merge.views, image)
        if merge.order is not None:
            out = out.unflatten(0, (count, branches))[merge.inverse].flatten(0, 1)
        if context_out is None:
            return out
        return out, context_out.unsqueeze(0).expand(count, *context_out.shape).flatten(0, 1)


class MergedAttention:
    """MAD on ``unet`` for ``views``: merged attention in the ``blocks`` selected, for the first ``steps`` steps.

    unet: a diffusers ``UNet2DConditionModel``, or a diffusion transformer with joint attention
    (``SD3Transformer2DModel``; ``joint`` is then True); views: the generation's ``CanvasViews`` (at latent
    resolution); steps: τ, the number of leading denoising steps with merged attention (0: never);
    blocks: any of "down", "mid", "up" (or a comma-separated string; thirds of a transformer's blocks).
    Raises ValueError (``check_mad``) when the views do not divide at a selected block's feature resolution.

    Use: ``with MergedAttention(unet, views, 15) as mad:`` (or ``install()`` / ``remove()``), wrap the
    denoiser's calls with ``mad.wrap`` and pass ``mad`` to ``sample_canvas(merged_attention=mad)``, which
    calls ``begin_step`` every step and batches all views while ``active``. ``remove`` puts back the exact
    processor objects that were there (the UNet is cached between jobs).
    """

    def __init__(self, unet, views: CanvasViews, steps: int, blocks=BLOCKS):
        if steps < 0:
            raise ValueError(f"--mad-steps must be 0 or more, not {steps}.")
        self.unet = unet
        self.views = views
        self.steps = steps
        self.blocks = parse_mad_blocks(blocks)
        self.active = False
        self.batch_views: tuple[int, ...] | None = None
        self.processors: dict[str, MergedAttentionProcessor] = {}
        check_mad(unet, views, self.blocks)  # one sentence now rather than in the first attention layer
        self.joint = bool(patch_size(unet))
        self.batch_shares_prompt = False  # a transformer's: whether the current call's views share their prompt
        self._plans: dict = {}
        self._context_answer = (None, 0, False)  # the last context checked, its view count, the answer
        self._originals: dict[str, tuple[torch.nn.Module, object]] = {}
        self._prompt_hook = None

    def install(self) -> "MergedAttention":
        """Give every attention layer of the selected blocks its own ``MergedAttentionProcessor``; returns self."""
        if self._originals:
            raise RuntimeError("MAD's processors are already installed.")
        for name, module in attention_layers(self.unet, self.blocks).items():
            self._originals[name] = (module, module.processor)
            self.processors[name] = MergedAttentionProcessor(self, name, module.processor)
            module.set_processor(self.processors[name])
        if self.joint:
            # A joint layer's context stream changes block by block; the prompts are compared where they enter.
            self._prompt_hook = self.unet.register_forward_pre_hook(self._check_prompts, with_kwargs=True)
        return self

    def _check_prompts(self, module, args, kwargs) -> None:
        """The transformer's forward pre-hook: ``batch_shares_prompt`` for this call, from its text tokens
        (``encoder_hidden_states``, (n * branches, L, D)) and pooled projections, each branch's rows alike for all
        the batch's views (``shares_context``)."""
        views = self.batch_views
        context, pooled = kwargs.get("encoder_hidden_states"), kwargs.get("pooled_projections")
        self.batch_shares_prompt = views is not None and all(
            tensor is None or self.shares_context(tensor, len(views)) for tensor in (context, pooled))

    def remove(self) -> None:
        """Put back the processor objects ``install`` replaced (identical objects), and stop merging."""
        for module, original in self._originals.values():
            module.set_processor(original)
        self._originals.clear()
        if self._prompt_hook is not None:
            self._prompt_hook.remove()
            self._prompt_hook = None
        self.processors = {}
        self.active, self.batch_views = False, None

    def __enter__(self) -> "MergedAttention":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()

    def use_views(self, views: CanvasViews) -> None:
        """Merge ``views`` from now on (the shifted schedule's windows of a step); the merge plans of the old views
        are dropped. Raises ValueError (``check_mad``) when they do not divide at a selected block's resolution."""
        if views is not self.views:
            check_mad(self.unet, views, self.blocks)
            self.views, self._plans = views, {}

    def begin_step(self, step_index: int) -> None:
        """Called by the loop first thing in step ``step_index`` (from 0): merge while step_index < τ."""
        self.active = step_index < self.steps

    def wrap(self, predict: Callable) -> Callable:
        """``predict(latents, timestep, views=None)`` that tells the processors which views the batch holds.

        Returns a callable with the same signature and result. ``views`` (the view indices of the batch's
        rows; None: unknown, so nothing is merged) stays recorded after the call returns, until the next
        wrapped call: a backward pass through gradient-checkpointed blocks (SyncDiffusion with
        ``--sync-checkpointing``) runs their forward again after ``predict`` has returned, and must merge
        the same views as the first forward did.
        """

        def predict_views(latents: torch.Tensor, timestep, views: Sequence[int] | None = None):
            self.batch_views = None if views is None else tuple(int(view) for view in views)
            return predict(latents, timestep, views)

        return predict_views

    def shares_context(self, context: torch.Tensor | None, count: int) -> bool:
        """Whether every view of each CFG branch of a batch of ``count`` views attends to the same context
        (always true for self-attention). Every cross-attention layer of a UNet call gets the same context
        tensor (the denoiser keeps one per batch), so the answer is kept for it: comparing it waits for the GPU."""
        if context is None:
            return True
        last, last_count, answer = self._context_answer
        if context is not last or count != last_count:
            per_view = context.unflatten(0, (count, context.shape[0] // count))
            answer = torch.equal(per_view, per_view[:1].expand_as(per_view))
            self._context_answer = (context, count, answer)
        return answer

    def merge_plan(self, views: tuple[int, ...], length: int, device: torch.device) -> "MergePlan":
        """How to merge a batch holding ``views`` (view indices, one per view of the batch) in a layer with
        ``length`` tokens per view, its index tensors on ``device``: a ``MergePlan``, cached per batch and
        resolution. Raises ValueError when the layer's feature maps are not square or do not divide the window."""
        key = (views, length, device)
        if key not in self._plans:
            side, size = math.isqrt(length), self.views.size
            if side * side != length or size % side:
                raise ValueError(f"MAD needs square feature maps that divide the {size}-latent window; "
                                 f"a layer has {length} tokens per view.")
            at_resolution, ordered = _at_resolution(self.views, size // side, "an attention layer"), sorted(views)
            if ordered != list(range(len(self.views))):
                at_resolution = at_resolution.subset(ordered)
            order = None if ordered == list(views) else torch.tensor(sorted(range(len(views)), key=views.__getitem__))
            seen = at_resolution.coverage(torch.zeros(())).flatten() > 0
            self._plans[key] = MergePlan(at_resolution, None if order is None else order.to(device),
                                         None if order is None else torch.argsort(order).to(device),
                                         None if bool(seen.all()) else seen.nonzero()[:, 0].to(device))
        return self._plans[key]


@dataclass(frozen=True)
class MergePlan:
    """How one batch merges at one feature resolution.

    views: the batch's views at that resolution, in ascending view numbers (``CanvasViews.subset``);
    order: LongTensor permutation that sorts the batch's views into that order (None: already sorted);
    inverse: the permutation that undoes ``order``;
    seen: LongTensor of the flattened canvas positions those views see (None: all of them).
    All on the device of the layer's features.
    """

    views: CanvasViews
    order: torch.Tensor | None
    inverse: torch.Tensor | None
    seen: torch.Tensor | None
