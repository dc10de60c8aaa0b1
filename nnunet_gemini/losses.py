"""GEMINI losses (docs/method.md section 7): masked local NCC (appearance), smoothness,
masked cosine (semantic), their combination with the method's gradient routing, restoration MSE.

All maths runs in float32 with autocast disabled (inputs are cast with .float()).
"""
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from nnunet_gemini.registration import float32_math, validity_mask, warp, warp_routed

NCC_EPS = 1e-8  # relative: in units of (global variance of I) * (global variance of J)


# ----------------------------------------------------------------------------- window sums
def _box_sum(x: torch.Tensor, window: int) -> torch.Tensor:
    """Sum over a centred window^d box with zero padding ('same' conv with a ones kernel),
    separable: one cumulative sum and one difference per spatial axis, O(d) work per voxel
    whatever the window. The input is zero-padded once on every axis (one extra leading zero
    for the difference); padded voxels stay zero through the sums along the other axes."""
    half = window // 2
    x = F.pad(x, [half + 1, half] * (x.ndim - 2))
    for dim in range(2, x.ndim):
        c = torch.cumsum(x, dim=dim)
        n = c.shape[dim]
        x = c.narrow(dim, window, n - window) - c.narrow(dim, 0, n - window)
    return x


def _dense_box_sum(x: torch.Tensor, window: int) -> torch.Tensor:
    """Reference: the same window sums as a dense window^d convolution (released code's way)."""
    ndim = x.ndim - 2
    conv = F.conv2d if ndim == 2 else F.conv3d
    kernel = torch.ones((1, 1) + (window,) * ndim, dtype=x.dtype, device=x.device)
    flat = x.reshape(-1, 1, *x.shape[2:])
    return conv(flat, kernel, padding=window // 2).reshape(x.shape)


# ----------------------------------------------------------------------------- NCC
def _check_pair(i: torch.Tensor, j: torch.Tensor, mask: Optional[torch.Tensor], what: str):
    if i.ndim not in (4, 5) or i.shape != j.shape:
        raise ValueError(f"{what}: inputs must be two (B, C, *spatial) tensors of one shape with 2 or 3 "
                         f"spatial dims, got {tuple(i.shape)} and {tuple(j.shape)}")
    if mask is not None and (mask.ndim != i.ndim or mask.shape[0] != i.shape[0]
                             or mask.shape[2:] != i.shape[2:] or mask.shape[1] not in (1, i.shape[1])):
        raise ValueError(f"{what}: mask must be (B, 1 or C, *spatial) matching {tuple(i.shape)}, "
                         f"got {tuple(mask.shape)}")


def _standardise(x: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std per (sample, channel) with detached statistics. Local NCC (with the
    window statistics below) is invariant to this map, so the gradients are unchanged, while
    float32 cancellation in the variances no longer depends on intensity offset or scale and
    the epsilon becomes relative. A constant channel becomes all zeros."""
    with torch.no_grad():
        dims = tuple(range(2, x.ndim))
        mean = x.mean(dim=dims, keepdim=True)
        std = (x - mean).square().mean(dim=dims, keepdim=True).sqrt()
        scale = std.clamp_min(torch.finfo(torch.float32).tiny)
    return (x - mean) / scale


def _local_cc(i: torch.Tensor, j: torch.Tensor, window: int, eps: float,
              box_sum: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
    """Per-voxel squared local correlation cc in [0, 1) of standardised i, j: (B, C, *spatial)."""
    if int(window) != window or window < 1 or window % 2 == 0:
        raise ValueError(f"ncc window must be a positive odd integer, got {window!r}")
    i, j = _standardise(i), _standardise(j)
    sums = box_sum(torch.cat([i, j, i * i, j * j, i * j], dim=0), int(window))
    s_i, s_j, s_ii, s_jj, s_ij = sums.chunk(5, dim=0)
    # statistics over the voxels of the window that lie inside the volume
    count = box_sum(torch.ones_like(i[:1, :1]), int(window))
    mean_i, mean_j = s_i / count, s_j / count
    cross = s_ij / count - mean_i * mean_j
    var_i = (s_ii / count - mean_i * mean_i).clamp_min(0)
    var_j = (s_jj / count - mean_j * mean_j).clamp_min(0)
    return cross * cross / (var_i * var_j + eps)


def _masked_ncc(i, j, mask, window, eps, box_sum, what) -> torch.Tensor:
    _check_pair(i, j, mask, what)
    with float32_math(i.device):
        cc = _local_cc(i.float(), j.float(), window, eps, box_sum)
        m = torch.ones_like(cc[:, :1]) if mask is None else mask.float()
        m = m.expand_as(cc)
        dims = (0,) + tuple(range(2, cc.ndim))
        per_channel = (m * cc).sum(dims) / m.sum(dims).clamp_min(torch.finfo(torch.float32).tiny)
        return 1.0 - per_channel.mean()


def local_ncc_loss(i: torch.Tensor, j: torch.Tensor, mask: Optional[torch.Tensor] = None,
                   window: int = 9, eps: float = NCC_EPS) -> torch.Tensor:
    """Masked local normalised cross-correlation loss, scalar: 1 - sum(m * cc) / sum(m).

    cc(p) = cross^2 / (var_i * var_j + eps) over the window^d box centred at p; window sums by a
    separable cumulative-sum box filter with zero padding (a 'same' conv with a ones kernel).
    Departures from the released code, both for exactness:
    - window means/variances use the number of in-volume voxels of each window (the released
      code divides by window^d, so border windows depend on the intensity offset);
    - i and j are first standardised per (sample, channel) (detached statistics), so `eps` is
      RELATIVE, in units of the product of the two images' global variances. Consequences: the
      loss is invariant to i -> a*i + b, j -> c*j + d (a, c > 0); a window where either image is
      constant has cc = 0 (finite value and gradients; two constant images give loss 1).
    mask: (B, 1 or C, *spatial) weights, None = all ones; an all-zero mask gives loss 1.
    Computed per channel (pooled over the batch), then averaged over channels.
    """
    return _masked_ncc(i, j, mask, window, eps, _box_sum, "local_ncc_loss")


def local_ncc_loss_dense(i: torch.Tensor, j: torch.Tensor, mask: Optional[torch.Tensor] = None,
                         window: int = 9, eps: float = NCC_EPS) -> torch.Tensor:
    """Reference for tests and benchmarks: local_ncc_loss with dense window^d convolutions."""
    return _masked_ncc(i, j, mask, window, eps, _dense_box_sum, "local_ncc_loss_dense")


# ----------------------------------------------------------------------------- smoothness
def _forward_diff(x: torch.Tensor, dim: int) -> torch.Tensor:
    n = x.shape[dim]
    return x.narrow(dim, 1, n - 1) - x.narrow(dim, 0, n - 1)


def smoothness_loss(field: torch.Tensor, kind: str = "gradient") -> torch.Tensor:
    """Regulariser of a (B, d, *spatial) field, scalar.

    "gradient": mean squared forward difference along each spatial axis, averaged over axes
    (the released L_smo). "bending": bending energy, mean over the d x d Hessian entries of the
    mean squared second differences (d2/dx_a^2 centred, mixed d2/dx_a dx_b by forward
    differences; each mixed term counts twice, as in the Hessian). Axes of size < 2 (< 3 for
    the pure second difference) contribute nothing.
    """
    if field.ndim not in (4, 5):
        raise ValueError(f"smoothness_loss needs a (B, d, *spatial) field, got {tuple(field.shape)}")
    if kind not in ("gradient", "bending"):
        raise ValueError(f"smoothness kind must be 'gradient' or 'bending', got {kind!r}")
    with float32_math(field.device):
        f = field.float()
        dims = list(range(2, f.ndim))
        zero = f.sum() * 0.0
        if kind == "gradient":
            terms = [_forward_diff(f, d).square().mean() for d in dims if f.shape[d] > 1]
            return torch.stack(terms).sum() / len(dims) if terms else zero
        total = zero
        for a in dims:
            if f.shape[a] > 2:
                total = total + _forward_diff(_forward_diff(f, a), a).square().mean()
            for b in dims:
                if b > a and f.shape[a] > 1 and f.shape[b] > 1:
                    total = total + 2.0 * _forward_diff(_forward_diff(f, a), b).square().mean()
        return total / len(dims) ** 2


# ----------------------------------------------------------------------------- cosine
def masked_cosine_loss(a: torch.Tensor, b: torch.Tensor, mask: Optional[torch.Tensor] = None,
                       eps: float = 1e-8) -> torch.Tensor:
    """1 - masked mean over voxels (and batch) of the cosine between a(p) and b(p) over channels.

    Vectors with norm < eps count as norm eps (a zero vector has cosine 0, finite gradient).
    mask: (B, 1, *spatial), None = all ones; an all-zero mask gives loss 1.
    """
    if a.shape != b.shape or a.ndim < 3:
        raise ValueError(f"masked_cosine_loss needs two (B, C, *spatial) tensors of one shape, "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}")
    if mask is not None and (mask.shape[0] != a.shape[0] or mask.shape[1] != 1 or mask.shape[2:] != a.shape[2:]):
        raise ValueError(f"masked_cosine_loss: mask must be (B, 1, *spatial) matching {tuple(a.shape)}, "
                         f"got {tuple(mask.shape)}")
    with float32_math(a.device):
        cos = (F.normalize(a.float(), dim=1, eps=eps) * F.normalize(b.float(), dim=1, eps=eps)).sum(1, keepdim=True)
        m = torch.ones_like(cos) if mask is None else mask.float()
        return 1.0 - (m * cos).sum() / m.sum().clamp_min(torch.finfo(torch.float32).tiny)


# ----------------------------------------------------------------------------- GEMINI total
@dataclass(frozen=True)
class GeminiWeights:
    """Released weights: total = smoothness*L_smo + semantic*L_gss + appearance*L_gvs, with
    L_gss = semantic_feature * (feature branch) + semantic_flow * (flow branch)."""
    smoothness: float = 0.4
    semantic: float = 0.8
    appearance: float = 1.0
    semantic_feature: float = 0.1
    semantic_flow: float = 1.0


def gemini_loss(img_a: torch.Tensor, img_b: torch.Tensor, feat_a: torch.Tensor, feat_b: torch.Tensor,
                disp_ab: torch.Tensor, disp_ba: torch.Tensor, reg_ab: Optional[torch.Tensor] = None,
                reg_ba: Optional[torch.Tensor] = None, weights: GeminiWeights = GeminiWeights(),
                ncc_window: int = 9, smoothness_kind: str = "gradient"
                ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """GEMINI loss of one pair with the method's gradient routing (docs/method.md sections 7-8).

    disp_ab maps B's grid into A (warp(img_a, disp_ab) ~ img_b); m_AB = validity_mask(disp_ab).
    - appearance  L_gvs = NCC(warp(A, u_AB), B; m_AB) + NCC(warp(B, u_BA), A; m_BA)  -> fields
    - semantic_feature  = cos(warp(fA, sg(u_AB)), fB; m_AB) + B->A                  -> features
    - semantic_flow     = cos(warp(sg(fA), u_AB), sg(fB); m_AB) + B->A               -> fields
      L_gss = w.semantic_feature * semantic_feature + w.semantic_flow * semantic_flow
    - smoothness  L_smo = smooth(reg_ab) + smooth(reg_ba), reg_* default to disp_* (pass the
      velocity fields for the diffeomorphic deformer)
    total = w.smoothness * L_smo + w.semantic * L_gss + w.appearance * L_gvs.
    Returns (total, terms); terms holds 0-d float32 tensors still attached to the graph (detach
    or .item() them for logging): "smoothness", "semantic" (= L_gss), "semantic_feature",
    "semantic_flow" (unweighted sums over both directions), "appearance", "ncc" (mean local cc
    over both directions = 1 - appearance / 2) and "total".
    """
    reg_ab = disp_ab if reg_ab is None else reg_ab
    reg_ba = disp_ba if reg_ba is None else reg_ba
    with float32_math(img_a.device):
        img_a, img_b, feat_a, feat_b = img_a.float(), img_b.float(), feat_a.float(), feat_b.float()
        if img_a.shape != img_b.shape or feat_a.shape != feat_b.shape or disp_ab.shape != disp_ba.shape:
            raise ValueError(f"gemini_loss: the two sides of a pair must share shapes, got images "
                             f"{tuple(img_a.shape)}/{tuple(img_b.shape)}, features {tuple(feat_a.shape)}/"
                             f"{tuple(feat_b.shape)}, fields {tuple(disp_ab.shape)}/{tuple(disp_ba.shape)}")
        # both directions in one sampling call each (ATen's CPU sampler parallelises over the batch
        # only); every sample is computed as alone, so the values are those of separate calls
        disp = torch.cat((disp_ab.float(), disp_ba.float()))
        m_ab, m_ba = validity_mask(disp).chunk(2)
        a_in_b, b_in_a = warp(torch.cat((img_a, img_b)), disp).chunk(2)
        appearance = (local_ncc_loss(a_in_b, img_b, m_ab, ncc_window)
                      + local_ncc_loss(b_in_a, img_a, m_ba, ncc_window))
        # the semantic branches need warp(f, sg(u)) and warp(sg(f), u): one sampling, routed twice
        to_features, to_fields = warp_routed(torch.cat((feat_a, feat_b)), disp)
        fa_in_b, fb_in_a = to_features.chunk(2)
        semantic_feature = (masked_cosine_loss(fa_in_b, feat_b, m_ab)
                            + masked_cosine_loss(fb_in_a, feat_a, m_ba))
        fa_in_b, fb_in_a = to_fields.chunk(2)
        semantic_flow = (masked_cosine_loss(fa_in_b, feat_b.detach(), m_ab)
                         + masked_cosine_loss(fb_in_a, feat_a.detach(), m_ba))
        semantic = weights.semantic_feature * semantic_feature + weights.semantic_flow * semantic_flow
        smoothness = smoothness_loss(reg_ab, smoothness_kind) + smoothness_loss(reg_ba, smoothness_kind)
        total = weights.smoothness * smoothness + weights.semantic * semantic + weights.appearance * appearance
    terms = {"smoothness": smoothness, "semantic": semantic, "semantic_feature": semantic_feature,
             "semantic_flow": semantic_flow, "appearance": appearance, "ncc": 1.0 - appearance / 2,
             "total": total}
    return total, terms


def restoration_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error in float32 (the caller applies the weight; released: 100)."""
    if pred.shape != target.shape:
        raise ValueError(f"restoration_loss: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    with float32_math(pred.device):
        return F.mse_loss(pred.float(), target.float())


def decorrelation_loss(feats: torch.Tensor) -> torch.Tensor:
    """Mean squared off-diagonal correlation of the feature channels over each sample's voxels
    (VICReg's covariance term on correlations): 0 for decorrelated channels, 1 when every channel
    is the same signal up to scale. GSS has no negatives; this term keeps its features from
    collapsing into a few dimensions. feats: (B, C, *spatial) with C >= 2."""
    if feats.ndim < 3 or feats.shape[1] < 2:
        raise ValueError(f"decorrelation_loss: feats {tuple(feats.shape)} is not (B, C >= 2, *spatial)")
    with float32_math(feats.device):
        f = feats.float().flatten(2)
        f = f - f.mean(2, keepdim=True)
        f = f / f.pow(2).mean(2, keepdim=True).add(1e-6).sqrt()
        corr = f @ f.transpose(1, 2) / f.shape[2]  # (B, C, C), unit diagonal
        c = corr.shape[1]
        off = corr.pow(2).sum((1, 2)) - torch.diagonal(corr, dim1=1, dim2=2).pow(2).sum(1)
        return (off / (c * (c - 1))).mean()
