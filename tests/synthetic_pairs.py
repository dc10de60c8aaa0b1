"""A 2D image pair related by a known smooth deformation (shared by tests and benchmarks)."""
import torch
import torch.nn.functional as F

from nnunet_gemini.registration import warp


def _blur(x, sigma):
    r = int(3 * sigma)
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))


def synthetic_pair(size=64, max_disp=3.0, seed=0):
    """Smooth random texture A, smooth random displacement u (|u| <= max_disp voxels),
    B = warp(A, u): the ideal u_AB is u."""
    g = torch.Generator().manual_seed(seed)
    a = _blur(torch.randn(1, 1, size, size, generator=g), 2.0)
    a = (a - a.mean()) / a.std()
    u = F.interpolate(torch.randn(1, 2, 4, 4, generator=g), size=(size, size), mode="bicubic", align_corners=True)
    u = u * (max_disp / u.norm(dim=1).max())
    return a, warp(a, u), u
