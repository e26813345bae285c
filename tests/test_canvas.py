"""Crop views cover every canvas position, read wrapped windows exactly, and fuse by averaging."""

import pytest
import torch

from backend.sphere.canvas import Canvas, CropView, window_starts
from backend.engine.decode import axis_tiles
from backend.sphere.view_sets import CanvasViews


@pytest.mark.parametrize("kind", ["wide", "equirect", "tile"])
@pytest.mark.parametrize("height,width,window,stride", [(64, 64, 64, 8), (64, 131, 64, 8), (70, 203, 64, 16), (33, 97, 32, 7), (16, 16, 16, 16)])
def test_every_position_is_covered(kind, height, width, window, stride):
    canvas = Canvas(kind, height, width)
    coverage = canvas.coverage(canvas.crop_views(window, stride), torch.zeros(1))
    assert coverage.min() >= 1


def test_planar_windows_match_diffusers_and_add_a_last_window():
    # diffusers: (size - window) // stride + 1 windows starting at multiples of the stride.
    assert window_starts(80, 64, 8, wraps=False) == [0, 8, 16]
    # 83 is not 64 + k*8: diffusers would leave columns 80..82 blank; we add a window at 19.
    assert window_starts(83, 64, 8, wraps=False) == [0, 8, 16, 19]
    # Wrapping: windows all the way round, the last ones crossing the edge.
    assert window_starts(80, 64, 8, wraps=True) == list(range(0, 80, 8))


def test_wrapped_read_equals_rolled_canvas():
    canvas = Canvas("tile", 12, 20)
    tensor = torch.randn(1, 4, 12, 20)
    view = CropView(top=9, left=15, height=8, width=8)
    expected = torch.roll(tensor, shifts=(-9, -15), dims=(2, 3))[:, :, :8, :8]
    assert torch.equal(canvas.read(tensor, [view]), expected)


def test_fusion_averages_overlaps_across_the_wrap():
    canvas = Canvas("equirect", 4, 10)
    views = [CropView(0, 0, 4, 6), CropView(0, 6, 4, 6)]  # the second wraps onto columns 0..1
    values = torch.stack([torch.full((4, 4, 6), 1.0), torch.full((4, 4, 6), 3.0)])
    fused = CanvasViews(canvas, views).fuse(values)
    assert torch.equal(fused[0, 0, 0], torch.tensor([2.0, 2.0, 1, 1, 1, 1, 3, 3, 3, 3]))


def test_decode_tiles_cover_large_canvases():
    # 4096 x 2048 px at factor 8: 512 x 256 latents, in tiles of 96 overlapping by 16.
    for size, wraps in ((512, True), (256, False)):
        tiles = axis_tiles(size, 96, 16, 128, wraps)
        covered = torch.zeros(size)
        for start, length in tiles:
            covered[(start + torch.arange(length)) % size] += 1
        assert covered.min() >= 1 and all(length == 96 for _, length in tiles)
