"""SyncDiffusion (Lee et al., NeurIPS 2023, Alg. 1 and Eq. 14): pull every view towards an anchor view.

Before the scheduler step of a guided denoising step, each view's x_t (except the anchor's) moves down
the gradient of a perceptual loss between its decoded predicted clean image and the anchor's:
``x_t <- x_t - w_i * grad_{x_t} L(D(x0(x_t)), D(x0(x_anchor)))`` with ``w_i = w * decay^i`` at step i.
The anchor's prediction and decode are computed once per step without autograd (the published code
differentiates it and throws the result away); the other views go through the gradient pass in chunks.
The loop then predicts the noise again at the updated x_t and steps, as the paper's algorithm does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ...sphere.canvas import Canvas, CropView
from ...sphere.view_sets import CanvasViews
from .tweedie import predicted_clean_latent


def anchor_view_index(canvas: Canvas, views: list[CropView]) -> int:
    """The default anchor among crop windows: the view whose centre is nearest the canvas centre. Distances
    wrap where the canvas wraps."""

    def distance(view: CropView) -> float:
        dy = (view.top + view.height / 2) - canvas.height / 2
        dx = (view.left + view.width / 2) - canvas.width / 2
        if canvas.wraps_x:
            dx = (dx + canvas.width / 2) % canvas.width - canvas.width / 2
        if canvas.wraps_y:
            dy = (dy + canvas.height / 2) % canvas.height - canvas.height / 2
        return dx * dx + dy * dy

    return min(range(len(views)), key=lambda index: distance(views[index]))


def ring_anchor_indices(views: CanvasViews) -> list[int]:
    """The default anchor of every view, one list entry per view.

    On an ``equirect`` canvas each ring of views (the views whose centres share a pitch: a row of crop
    windows, MVDiffusion's ring, the up face, the down face) has its own anchor, its view facing nearest
    yaw 0, the image centre (docs/conventions.md#directions): a view of the sky is pulled towards sky, not
    towards the horizon (docs/conventions.md#views: views at different pitch see different things). The up
    and down faces are rings of one, their own anchors, so the guidance leaves them to the fusion. Other
    canvases use one anchor for all views, the view nearest the centre, as the paper does.
    """
    if views.canvas.kind != "equirect":
        return [anchor_view_index(views.canvas, views.crops)] * len(views)
    centres = views.centres()
    ring_anchor = {}
    for index, (yaw, pitch) in enumerate(centres):
        ring = round(pitch, 6)
        if ring not in ring_anchor or abs(yaw) < abs(centres[ring_anchor[ring]][0]):
            ring_anchor[ring] = index
    return [ring_anchor[round(pitch, 6)] for _, pitch in centres]


@dataclass
class SyncDiffusionGuidance:
    """SyncDiffusion's settings and its gradient step.

    predict: (N, C, h, w) model input, timestep, the N views' indices -> guided prediction, differentiable
        (the denoiser's ``predict``; the indices choose each view's prompt). decode: latents (N, C, h, w) -> images (N, 3, H, W) in [-1, 1], differentiable (the
        model's VAE decoder, or a tiny autoencoder for the fast path).
    loss: (images, anchor images) -> per-view loss (N,), e.g. ``backend.perceptual.PerceptualLoss``.
    anchors: the anchor of every view, one index per view (``ring_anchor_indices``); anchors are the views
        that are their own anchor, and never move.
    weight, decay: w and the per-step decay; steps: guide only the first ``steps`` steps (None: all);
    every: guide every ``every``-th step; chunk: views per gradient pass.
    reuse_prediction: the fast path that skips the paper's second UNet pass: the loop steps every view
        with the prediction made at its x_t before the update.
    """

    predict: Callable
    decode: Callable
    loss: Callable
    anchors: list[int]
    weight: float = 20.0
    decay: float = 0.95
    steps: int | None = None
    every: int = 1
    chunk: int = 4
    reuse_prediction: bool = False
    guided_steps: int = 0  # how many steps were guided so far (metadata)

    def weight_at(self, step_index: int) -> float:
        """w_i for step ``step_index`` (0-based), or 0.0 on steps without guidance."""
        if self.weight == 0 or step_index % self.every or (self.steps is not None and step_index >= self.steps):
            return 0.0
        return self.weight * self.decay**step_index

    def guide(self, view_latents: torch.Tensor, timestep, scheduler, step_index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Move every non-anchor view of ``view_latents`` (N, C, h, w) down the loss gradient.

        scheduler: a copy at the current step (``scale_model_input`` and x0 read its state).
        Returns (guided latents (N, C, h, w), the anchor's row unchanged; the predictions made at the
        latents before the update (N, C, h, w) when ``reuse_prediction``, else None). On a step without
        guidance returns ``(view_latents, None)`` and runs nothing.
        """
        weight = self.weight_at(step_index)
        if weight == 0.0:
            return view_latents, None
        self.guided_steps += 1
        anchors = sorted(set(self.anchors))
        with torch.no_grad():
            anchor_latents = view_latents[anchors]
            anchor_predictions = self.predict(scheduler.scale_model_input(anchor_latents, timestep), timestep, anchors)
            anchor_images = self.decode(predicted_clean_latent(scheduler, anchor_latents, anchor_predictions, timestep))
        image_of_anchor = {anchor: anchor_images[row] for row, anchor in enumerate(anchors)}
        guided = view_latents.clone()
        predictions = torch.empty_like(view_latents) if self.reuse_prediction else None
        if predictions is not None:
            predictions[anchors] = anchor_predictions
        others = [index for index in range(view_latents.shape[0]) if index not in image_of_anchor]
        for start in range(0, len(others), self.chunk):
            indices = others[start : start + self.chunk]
            targets = torch.stack([image_of_anchor[self.anchors[index]] for index in indices])
            gradient, prediction = self.gradient(view_latents[indices], indices, targets, timestep, scheduler)
            guided[indices] = view_latents[indices] - weight * gradient
            if predictions is not None:
                predictions[indices] = prediction
        return guided, predictions

    def gradient(self, latents: torch.Tensor, views, anchor_image: torch.Tensor, timestep, scheduler) -> tuple[torch.Tensor, torch.Tensor]:
        """d loss / d x_t for each view of ``latents`` (n, C, h, w; the views numbered ``views``) against ``anchor_image`` (1 or n, 3, H, W:
        one target for all views or one per view), and the (detached) predictions at ``latents``; both
        (n, C, h, w).

        The per-view losses are summed: the views do not interact in the UNet or the decoder, so each
        view's gradient is that of its own loss.
        """
        with torch.enable_grad():
            latents = latents.detach().requires_grad_(True)
            prediction = self.predict(scheduler.scale_model_input(latents, timestep), timestep, views)
            images = self.decode(predicted_clean_latent(scheduler, latents, prediction, timestep))
            loss = self.loss(images, anchor_image.expand_as(images)).sum()
            (gradient,) = torch.autograd.grad(loss, latents)
        return gradient, prediction.detach()
