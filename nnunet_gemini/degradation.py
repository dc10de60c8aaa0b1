"""Models-Genesis appearance damage for the restoration task (Zhou et al., "Models Genesis",
Medical Image Analysis 2021), vectorised torch, 2D and 3D.

nnU-Net inputs are z-scored or CT-normalised, so each (sample, channel) is first min-max
rescaled to [0, 1] (a constant channel becomes 0); the damage acts on that copy, and the
undamaged copy is the restoration target. Per sample, in the Models Genesis order:
1. local pixel shuffling (prob. p_shuffle): the volume is tiled (random tile size, 1 to n//10
   voxels per axis as Models Genesis' blocks, random tiling offset) and the voxels inside about
   half of the tiles are permuted (argsort of random keys, one gather); two such rounds. Tiles
   do not overlap, so the result does not depend on write order (deterministic on CUDA too).
   The same permutation moves all channels.
2. non-linear intensity mapping (prob. p_bezier): a random cubic Bezier curve from (0,0) to
   (1,1) used as a lookup table (piecewise-linear interpolation, searchsorted); increasing or,
   with prob. 1/2, reversed, as in Models Genesis.
3. painting, mutually exclusive as in Models Genesis: out-painting (prob. p_outpaint: all
   noise except up to 5 boxes of 3/7 to 4/7 of each side that keep the image) or in-painting
   (prob. p_inpaint: up to 5 boxes of 1/6 to 1/3 of each side filled with uniform noise).
   The released GEMINI uses in-painting only, hence p_outpaint = 0 by default (Models Genesis'
   own setting is p_outpaint = 0.72, p_inpaint = 0.18).

batchgeneratorsv2 is not reused: its BlankRectangleTransform fills boxes with one value (not
noise) and, like its other transforms, draws from numpy's global RNG, which defeats a seeded
torch generator; nothing there shuffles pixels or applies a Bezier mapping.
"""
from typing import Optional, Tuple

import torch

_BEZIER_POINTS = 1024  # lookup-table resolution of the Bezier curve


class _Rng:
    """Draws from `generator` (on its device) and moves results to `device`."""

    def __init__(self, generator: Optional[torch.Generator], device: torch.device):
        self.generator = generator
        self.draw_device = generator.device if generator is not None else device
        self.device = device

    def rand(self, *shape) -> torch.Tensor:
        return torch.rand(shape, generator=self.generator, device=self.draw_device).to(self.device)

    def uniform(self) -> float:
        return float(torch.rand((), generator=self.generator, device=self.draw_device))

    def randint(self, low: int, high: int) -> int:
        """Integer in [low, high] (inclusive)."""
        return low + int(self.uniform() * (high - low + 1)) if high > low else low


def minmax_rescale(x: torch.Tensor) -> torch.Tensor:
    """Per (sample, channel) min-max rescale to [0, 1] in float32; a constant channel becomes 0."""
    x = x.float()
    flat = x.flatten(2)
    lo = flat.amin(dim=2).view(*x.shape[:2], *([1] * (x.ndim - 2)))
    span = flat.amax(dim=2).view_as(lo) - lo
    return torch.where(span > 0, (x - lo) / span.clamp_min(torch.finfo(torch.float32).tiny),
                       torch.zeros_like(x)).clamp(0, 1)


def _shuffle_tiles(x: torch.Tensor, rng: _Rng) -> torch.Tensor:
    """One round of local pixel shuffling of a (C, *spatial) sample."""
    spatial = x.shape[1:]
    tile = [rng.randint(1, max(1, n // 10)) for n in spatial]
    if all(t == 1 for t in tile):  # a 1-voxel tile cannot shuffle: widen the longest axis
        longest = max(range(len(spatial)), key=lambda a: spatial[a])
        tile[longest] = min(2, spatial[longest])
    counts = [n // t for n, t in zip(spatial, tile)]
    if min(counts) == 0 or all(t == 1 for t in tile):
        return x
    shift = [rng.randint(0, n - 1) for n in spatial]
    dims = tuple(range(1, x.ndim))
    rolled = torch.roll(x, shift, dims)
    core = rolled[(slice(None),) + tuple(slice(0, c * t) for c, t in zip(counts, tile))]
    # (C, c0, t0, c1, t1, ...) -> (C, tiles, voxels per tile)
    split = core.reshape(x.shape[0], *[v for ct in zip(counts, tile) for v in ct])
    nd = len(spatial)
    order = [0] + [1 + 2 * a for a in range(nd)] + [2 + 2 * a for a in range(nd)]
    tiles = split.permute(order).reshape(x.shape[0], -1, int(torch.tensor(tile).prod()))
    n_tiles, tile_vol = tiles.shape[1:]
    keys = rng.rand(n_tiles, tile_vol)
    selected = rng.rand(n_tiles, 1) < 0.5
    keys = torch.where(selected, keys, torch.arange(tile_vol, device=x.device, dtype=keys.dtype).expand_as(keys))
    perm = keys.argsort(dim=1)
    shuffled = tiles.gather(2, perm.unsqueeze(0).expand_as(tiles))
    inverse = [0] * (2 * nd + 1)
    for position, axis in enumerate(order):
        inverse[axis] = position
    shuffled = shuffled.reshape(x.shape[0], *counts, *tile).permute(inverse).reshape(core.shape)
    rolled = rolled.clone()
    rolled[(slice(None),) + tuple(slice(0, c * t) for c, t in zip(counts, tile))] = shuffled
    return torch.roll(rolled, [-s for s in shift], dims)


def _bezier_map(x: torch.Tensor, rng: _Rng) -> torch.Tensor:
    """Random monotone cubic Bezier intensity mapping of values in [0, 1]."""
    p1, p2 = rng.rand(2), rng.rand(2)
    t = torch.linspace(0, 1, _BEZIER_POINTS, device=x.device).unsqueeze(1)
    curve = (3 * (1 - t) ** 2 * t * p1 + 3 * (1 - t) * t ** 2 * p2 + t ** 3)  # P0 = (0,0), P3 = (1,1)
    lut_x, lut_y = curve[:, 0].contiguous(), curve[:, 1].contiguous()  # x(t) is monotone for P1,P2 in [0,1]^2
    if rng.uniform() < 0.5:
        lut_y = lut_y.flip(0)  # decreasing mapping, as Models Genesis' unsorted branch
    lut_x, sort = lut_x.sort()
    lut_y = lut_y[sort]
    flat = x.reshape(-1).contiguous()
    hi = torch.searchsorted(lut_x, flat).clamp(1, _BEZIER_POINTS - 1)
    x0, x1, y0, y1 = lut_x[hi - 1], lut_x[hi], lut_y[hi - 1], lut_y[hi]
    w = ((flat - x0) / (x1 - x0).clamp_min(1e-12)).clamp(0, 1)
    return (y0 + w * (y1 - y0)).clamp(0, 1).reshape(x.shape)


def _box_mask(spatial, rng: _Rng, device, min_frac: float, max_frac: float) -> torch.Tensor:
    """Union of 1 to 5 random boxes (each side a fraction in [min_frac, max_frac] of the axis):
    the first box always, each further one with prob. 0.95 while boxes remain (Models Genesis)."""
    mask = torch.zeros(spatial, dtype=torch.bool, device=device)
    for box in range(5):
        if box > 0 and rng.uniform() >= 0.95:
            break
        inside = None
        for axis, n in enumerate(spatial):
            size = rng.randint(max(1, int(n * min_frac)), max(1, int(n * max_frac)))
            start = rng.randint(0, n - size)
            line = torch.zeros(n, dtype=torch.bool, device=device)
            line[start:start + size] = True
            line = line.view(*[n if a == axis else 1 for a in range(len(spatial))])
            inside = line if inside is None else inside & line
        mask |= inside
    return mask


def models_genesis_damage(x: torch.Tensor, generator: Optional[torch.Generator] = None,
                          p_shuffle: float = 0.8, p_bezier: float = 0.9, p_inpaint: float = 0.9,
                          p_outpaint: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(B, C, *spatial) -> (damaged, target), both float32 in [0, 1] of x's shape; target is the
    per (sample, channel) min-max rescaled x, damaged the same after the module docstring's
    damage (each decision drawn per sample). Deterministic for a seeded `generator` (random
    numbers are drawn on the generator's device; default: torch's global RNG on x's device).
    Requires p_inpaint + p_outpaint <= 1 (the two paintings exclude each other)."""
    if x.ndim not in (4, 5):
        raise ValueError(f"models_genesis_damage needs (B, C, *spatial) with 2 or 3 spatial dims, "
                         f"got {tuple(x.shape)}")
    for name, p in (("p_shuffle", p_shuffle), ("p_bezier", p_bezier), ("p_inpaint", p_inpaint),
                    ("p_outpaint", p_outpaint)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
    if p_inpaint + p_outpaint > 1.0 + 1e-9:
        raise ValueError(f"p_inpaint + p_outpaint must be <= 1, got {p_inpaint} + {p_outpaint}")
    rng = _Rng(generator, x.device)
    with torch.no_grad():
        target = minmax_rescale(x)
        damaged = []
        for sample in target:
            out = sample
            if rng.uniform() < p_shuffle:
                out = _shuffle_tiles(_shuffle_tiles(out, rng), rng)
            if rng.uniform() < p_bezier:
                out = _bezier_map(out, rng)
            paint = rng.uniform()
            spatial = tuple(out.shape[1:])
            if paint < p_outpaint:
                keep = _box_mask(spatial, rng, x.device, 3 / 7, 4 / 7)
                out = torch.where(keep, out, rng.rand(*out.shape))
            elif paint < p_outpaint + p_inpaint:
                hole = _box_mask(spatial, rng, x.device, 1 / 6, 1 / 3)
                out = torch.where(hole, rng.rand(*out.shape), out)
            damaged.append(out)
        return torch.stack(damaged), target
