#!/usr/bin/env python3
"""Extend a photo into a world (``--photo``, issue 18): how close the photo's region stays to the photo, and how
coherent its border is, on the development model (``shared/models/toy-landscape``).

The photo is a perspective view (``--fov``, 4:3) cut from a panorama the model painted with another seed, so it is
something the model can continue. Then, with the same seed and prompt:

- ``--photo``: generate around the photo (the loop keeps its latent; the photo composited back);
- ``paste``: generate without it and composite the photo over the result the same way (the same feathered edge):
  what the border looks like when nothing is painted around the photo.

Printed: the mean |panorama - photo| over the photo's region (target <= 3/255), and the border ratio: the mean
gradient (|dx| + |dy|, in /255) over a ring of ``RING_PX`` px on both sides of the region's border, over the mean
gradient outside the region beyond the ring (1: the border is no busier than the rest of the image).

    python benchmarks/measure_photo_border.py [--model DIR] [--steps 20] [--seeds 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import numpy as np  # noqa: E402

from backend.app.cli import main  # noqa: E402
from backend.engine.photo_region import composite_photo, photo_region  # noqa: E402
from backend.products.images import read_panorama, write_png  # noqa: E402
from backend.sphere.geometry import equirect_to_perspective  # noqa: E402

RING_PX = 4
PLACE = (60.0, 5.0)  # where the photo is put (yaw, pitch)


def generate(model: str, out: str, seed: int, steps: int, width: int, extra: list[str]) -> np.ndarray:
    """The panorama.png of one ``generate`` run, as (H, W, 3) floats."""
    code = main(["generate", "--prompt", "a valley under a blue sky", "--model", model, "--device", "cpu",
                 "--width", str(width), "--steps", str(steps), "--seed", str(seed), "--no-hdr", "--overwrite",
                 "--preview-every", "0", "--stride", "4", "--out", out, *extra])
    assert code == 0, code
    return read_panorama(os.path.join(out, "panorama.png"))


def grown(mask: np.ndarray, pixels: int) -> np.ndarray:
    """``mask`` dilated by ``pixels`` (4-neighbours; columns wrap)."""
    for _ in range(pixels):
        mask = mask | np.roll(mask, 1, 1) | np.roll(mask, -1, 1) | np.roll(mask, 1, 0) | np.roll(mask, -1, 0)
    return mask


def border_ratio(image: np.ndarray, inside: np.ndarray) -> float:
    """Mean gradient in the ring of RING_PX px around the border of ``inside`` over the mean gradient outside it."""
    gradient = (np.abs(np.roll(image, -1, 1) - image) + np.abs(np.roll(image, -1, 0) - image)).mean(axis=-1)
    gradient[-1] = 0  # no row below the last
    ring = grown(inside, RING_PX) & grown(~inside, RING_PX)
    elsewhere = ~grown(inside, RING_PX)
    elsewhere[-1] = False
    return float(gradient[ring[:-1].nonzero()[0], ring[:-1].nonzero()[1]].mean() / gradient[elsewhere].mean())


def main_() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=os.path.join(os.path.dirname(os.path.dirname(HERE)), "shared", "models", "toy-landscape"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=1)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--fov", type=float, default=90.0)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        source = generate(args.model, os.path.join(folder, "source"), 100, args.steps, args.width, [])
        size = args.width // 4
        view = equirect_to_perspective(source, 0.0, 0.0, 0.0, args.fov, size)
        photo_path = os.path.join(folder, "photo.png")
        write_png(photo_path, view[size // 8 : size - size // 8])  # 4:3
        photo = read_panorama(photo_path)
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            extended = generate(args.model, os.path.join(folder, "photo"), seed, args.steps, args.width,
                                ["--photo", photo_path, "--photo-fov", str(args.fov), "--photo-yaw", str(PLACE[0]),
                                 "--photo-pitch", str(PLACE[1])])
            plain = generate(args.model, os.path.join(folder, "plain"), seed, args.steps, args.width, [])
            region = photo_region(photo, args.fov, *PLACE, args.width, args.width // 2)
            pasted = composite_photo(plain, region)
            inside = region.inside
            rows.append((seed, np.abs(extended - region.pixels)[inside].mean() * 255,
                         border_ratio(extended, inside), border_ratio(pasted, inside), border_ratio(plain, inside)))
    print(f"\n{args.width}x{args.width // 2} px, photo {args.fov:g}° 4:3 at yaw {PLACE[0]:g} pitch {PLACE[1]:g}, "
          f"{args.steps} steps, toy model")
    print("| seed | region vs photo (/255) | border ratio --photo | border ratio paste | plain image (no photo) |")
    print("|---|---|---|---|---|")
    for seed, difference, extended, pasted, plain in rows:
        print(f"| {seed} | {difference:.2f} | {extended:.2f} | {pasted:.2f} | {plain:.2f} |")
    mean = np.mean([row[1:] for row in rows], axis=0)
    print(f"| mean | {mean[0]:.2f} | {mean[1]:.2f} | {mean[2]:.2f} | {mean[3]:.2f} |")


if __name__ == "__main__":
    main_()
