"""NCC against its dense reference, invariances, masks, smoothness, cosine, gradient routing."""
import pytest
import torch
import torch.nn.functional as F

from nnunet_gemini.losses import (
    GeminiWeights,
    gemini_loss,
    local_ncc_loss,
    local_ncc_loss_dense,
    masked_cosine_loss,
    restoration_loss,
    smoothness_loss,
)


def _smooth_image(shape, seed):
    g = torch.Generator().manual_seed(seed)
    spatial = shape[2:]
    coarse = torch.randn(shape[:2] + tuple(max(2, n // 3) for n in spatial), generator=g)
    mode = "bilinear" if len(spatial) == 2 else "trilinear"
    return F.interpolate(coarse, size=spatial, mode=mode, align_corners=True)


@pytest.mark.parametrize("shape", [(2, 2, 17, 14), (2, 1, 12, 11, 10)])
@pytest.mark.parametrize("window", [3, 5, 9])
def test_box_filter_ncc_equals_dense_reference(shape, window):
    g = torch.Generator().manual_seed(window)
    i = torch.randn(shape, generator=g)
    j = 0.6 * i + torch.randn(shape, generator=g)
    mask = (torch.rand((shape[0], 1) + shape[2:], generator=g) > 0.3).float()
    for m in (None, mask):
        fast, dense = local_ncc_loss(i, j, m, window), local_ncc_loss_dense(i, j, m, window)
        assert abs(fast.item() - dense.item()) < 1e-5
        assert 0.05 < fast.item() < 0.95  # a real, partial correlation


@pytest.mark.parametrize("shape", [(2, 1, 24, 22), (1, 2, 16, 14, 12)])
def test_identical_smooth_images_reach_the_minimum(shape):
    x = _smooth_image(shape, 0)
    assert local_ncc_loss(x, x).item() < 1e-3
    assert local_ncc_loss(x, _smooth_image(shape, 1)).item() > 0.2


def test_invariant_to_positive_affine_intensity_change():
    i, j = _smooth_image((2, 1, 14, 12, 10), 2), _smooth_image((2, 1, 14, 12, 10), 3)
    j = j + 0.5 * i
    mask = torch.ones(2, 1, 14, 12, 10)
    mask[..., :4] = 0
    ref = local_ncc_loss(i, j, mask, 5)
    for a, b in ((3.0, 100.0), (0.01, -2.0), (250.0, 1000.0)):
        assert abs(local_ncc_loss(a * i + b, j, mask, 5).item() - ref.item()) < 1e-4
        assert abs(local_ncc_loss(i, a * j + b, mask, 5).item() - ref.item()) < 1e-4


def test_mask_excludes_voxels():
    g = torch.Generator().manual_seed(4)
    i, j = torch.randn(2, 1, 20, 20, generator=g), torch.randn(2, 1, 20, 20, generator=g)
    mask = torch.zeros(2, 1, 20, 20)
    mask[..., :8] = 1  # windows of size 5 centred in columns < 8 reach columns < 10 only
    ref = local_ncc_loss(i, j, mask, 5)
    i2, j2 = i.clone(), j.clone()
    i2[..., 10:] = torch.randn(2, 1, 20, 10, generator=g)
    j2[..., 10:] = 5.0
    assert local_ncc_loss(i2, j2, mask, 5).item() == pytest.approx(ref.item(), abs=1e-6)
    assert local_ncc_loss(i2, j2, None, 5).item() != pytest.approx(local_ncc_loss(i, j, None, 5).item(), abs=1e-3)


def test_constant_images_give_documented_value_and_finite_gradients():
    i = torch.full((1, 1, 10, 9, 8), 0.3, requires_grad=True)
    j = torch.full((1, 1, 10, 9, 8), 7.0, requires_grad=True)
    loss = local_ncc_loss(i, j)
    loss.backward()
    assert loss.item() == 1.0  # cc = 0 wherever a window is constant
    assert torch.isfinite(i.grad).all() and torch.isfinite(j.grad).all()
    k = _smooth_image((1, 1, 10, 9, 8), 5).requires_grad_()
    loss = local_ncc_loss(k, j.detach())
    loss.backward()
    assert loss.item() == pytest.approx(1.0, abs=1e-6) and torch.isfinite(k.grad).all()


def test_ncc_errors():
    with pytest.raises(ValueError, match="odd"):
        local_ncc_loss(torch.zeros(1, 1, 5, 5), torch.zeros(1, 1, 5, 5), window=4)
    with pytest.raises(ValueError, match="one shape"):
        local_ncc_loss(torch.zeros(1, 1, 5, 5), torch.zeros(1, 1, 5, 6))


def test_smoothness_values():
    ramp = torch.arange(6.0).view(1, 1, 6, 1).expand(1, 2, 6, 5)  # unit slope along axis 0 only
    assert smoothness_loss(ramp).item() == pytest.approx(0.5)  # (1 + 0) / 2 axes
    assert smoothness_loss(ramp, "bending").item() == pytest.approx(0.0)  # linear: no curvature
    quad = (torch.arange(6.0) ** 2).view(1, 1, 6, 1, 1).expand(1, 3, 6, 4, 3)
    assert smoothness_loss(quad, "bending").item() == pytest.approx(4.0 / 9)  # d2 = 2, squared 4, over 3x3 entries
    saddle = (torch.arange(5.0).view(5, 1) * torch.arange(5.0).view(1, 5)).expand(1, 2, 5, 5)
    assert smoothness_loss(saddle, "bending").item() == pytest.approx(2.0 / 4)  # mixed = 1, counted twice
    assert smoothness_loss(torch.zeros(2, 3, 4, 4, 4)).item() == 0.0


def test_masked_cosine():
    a = torch.randn(2, 4, 6, 5)
    assert masked_cosine_loss(a, a).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_cosine_loss(a, -a).item() == pytest.approx(2.0, abs=1e-6)
    assert masked_cosine_loss(a, 3 * a).item() == pytest.approx(0.0, abs=1e-6)
    mask = torch.zeros(2, 1, 6, 5)
    mask[..., :2] = 1
    b = a.clone()
    b[..., 2:] = -a[..., 2:]
    assert masked_cosine_loss(a, b, mask).item() == pytest.approx(0.0, abs=1e-6)
    z = torch.zeros(1, 3, 4, 4, requires_grad=True)
    loss = masked_cosine_loss(z, torch.randn(1, 3, 4, 4))
    loss.backward()
    assert loss.item() == pytest.approx(1.0) and torch.isfinite(z.grad).all()


def test_restoration_loss_is_mse():
    assert restoration_loss(torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)).item() == 1.0


def _pair(ndim, seed=0):
    g = torch.Generator().manual_seed(seed)
    spatial = (10, 9, 8)[:ndim]
    img_a, img_b = _smooth_image((2, 1) + spatial, seed), _smooth_image((2, 1) + spatial, seed + 1)
    leaves = {
        "feat_a": torch.randn((2, 4) + spatial, generator=g).requires_grad_(),
        "feat_b": torch.randn((2, 4) + spatial, generator=g).requires_grad_(),
        "disp_ab": (0.7 * torch.randn((2, ndim) + spatial, generator=g)).requires_grad_(),
        "disp_ba": (0.7 * torch.randn((2, ndim) + spatial, generator=g)).requires_grad_(),
    }
    return img_a, img_b, leaves


# which leaves each term alone sends gradient to (docs/method.md section 8)
ROUTING = {
    "semantic_feature": {"feat_a", "feat_b"},
    "semantic_flow": {"disp_ab", "disp_ba"},
    "appearance": {"disp_ab", "disp_ba"},
    "smoothness": {"disp_ab", "disp_ba"},
    "semantic": {"feat_a", "feat_b", "disp_ab", "disp_ba"},
    "total": {"feat_a", "feat_b", "disp_ab", "disp_ba"},
}


@pytest.mark.parametrize("ndim", [2, 3])
def test_gemini_gradient_routing(ndim):
    img_a, img_b, leaves = _pair(ndim)
    _, terms = gemini_loss(img_a, img_b, **leaves, ncc_window=5)
    names = list(leaves)
    for term, expected in ROUTING.items():
        grads = torch.autograd.grad(terms[term], [leaves[n] for n in names], retain_graph=True, allow_unused=True)
        reached = {n for n, gr in zip(names, grads) if gr is not None and gr.abs().sum() > 0}
        assert reached == expected, term


def _unfused_terms(img_a, img_b, feat_a, feat_b, disp_ab, disp_ba, window):
    """gemini_loss as docs/method.md writes it: each direction and each routing warped on its own."""
    from nnunet_gemini.registration import validity_mask, warp
    m_ab, m_ba = validity_mask(disp_ab), validity_mask(disp_ba)
    appearance = (local_ncc_loss(warp(img_a, disp_ab), img_b, m_ab, window)
                  + local_ncc_loss(warp(img_b, disp_ba), img_a, m_ba, window))
    feature = (masked_cosine_loss(warp(feat_a, disp_ab.detach()), feat_b, m_ab)
               + masked_cosine_loss(warp(feat_b, disp_ba.detach()), feat_a, m_ba))
    flow = (masked_cosine_loss(warp(feat_a.detach(), disp_ab), feat_b.detach(), m_ab)
            + masked_cosine_loss(warp(feat_b.detach(), disp_ba), feat_a.detach(), m_ba))
    w = GeminiWeights()
    smoothness = smoothness_loss(disp_ab) + smoothness_loss(disp_ba)
    total = (w.smoothness * smoothness + w.semantic * (w.semantic_feature * feature + w.semantic_flow * flow)
             + w.appearance * appearance)
    return {"appearance": appearance, "semantic_feature": feature, "semantic_flow": flow, "total": total}


@pytest.mark.parametrize("ndim", [2, 3])
def test_stacked_and_routed_sampling_gives_the_unfused_loss_and_gradients(ndim):
    # gemini_loss samples both directions in one call and each feature warp once for both routings;
    # the values must be those of the per-direction form bit for bit, the gradients to float rounding
    img_a, img_b, leaves = _pair(ndim, seed=11)
    _, terms = gemini_loss(img_a, img_b, **leaves, ncc_window=5)
    reference = _unfused_terms(img_a, img_b, *leaves.values(), window=5)
    for name, value in reference.items():
        assert torch.equal(terms[name], value), name
    got = torch.autograd.grad(terms["total"], list(leaves.values()))
    want = torch.autograd.grad(reference["total"], list(leaves.values()))
    for name, g, w in zip(leaves, got, want):
        assert torch.allclose(g, w, rtol=1e-5, atol=1e-7 * w.abs().max().item()), name


def test_smoothness_acts_on_reg_fields_only():
    img_a, img_b, leaves = _pair(3, seed=3)
    reg_ab = torch.randn(2, 3, 10, 9, 8).requires_grad_()
    reg_ba = torch.randn(2, 3, 10, 9, 8).requires_grad_()
    _, terms = gemini_loss(img_a, img_b, **leaves, reg_ab=reg_ab, reg_ba=reg_ba, ncc_window=5)
    targets = list(leaves.values()) + [reg_ab, reg_ba]
    grads = torch.autograd.grad(terms["smoothness"], targets, allow_unused=True)
    assert all(gr is None for gr in grads[:4]) and all(gr is not None for gr in grads[4:])


def test_gemini_total_combines_weighted_terms():
    img_a, img_b, leaves = _pair(2, seed=5)
    w = GeminiWeights()
    total, t = gemini_loss(img_a, img_b, **leaves, ncc_window=5, smoothness_kind="bending")
    expected = w.smoothness * t["smoothness"] + w.semantic * t["semantic"] + w.appearance * t["appearance"]
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    expected = 0.1 * t["semantic_feature"] + 1.0 * t["semantic_flow"]
    assert t["semantic"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert t["ncc"].item() == pytest.approx(1 - t["appearance"].item() / 2, rel=1e-6)
    # identical pair with zero fields: appearance and semantic terms vanish
    zero = torch.zeros(2, 2, 10, 9)
    total, t = gemini_loss(img_a, img_a, leaves["feat_a"], leaves["feat_a"], zero, zero, ncc_window=5)
    assert t["appearance"].item() < 2e-3 and abs(t["semantic"].item()) < 1e-5 and t["smoothness"].item() == 0


def test_gemini_loss_float32_under_autocast():
    img_a, img_b, leaves = _pair(3, seed=7)
    half = {k: v.detach().bfloat16().requires_grad_() for k, v in leaves.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, terms = gemini_loss(img_a.bfloat16(), img_b.bfloat16(), **half, ncc_window=5)
    assert total.dtype == torch.float32 and all(v.dtype == torch.float32 for v in terms.values())
    total.backward()
    assert all(torch.isfinite(v.grad).all() for v in half.values())


def test_decorrelation_is_zero_for_independent_channels_and_one_for_collapsed_ones():
    from nnunet_gemini.losses import decorrelation_loss
    torch.manual_seed(0)
    independent = torch.randn(2, 8, 16, 16, 16)
    assert decorrelation_loss(independent).item() < 2.0 / 16 ** 3  # E[r^2] = 1/voxels
    signal = torch.randn(2, 1, 16, 16, 16)
    collapsed = signal * torch.linspace(0.5, 3.0, 8).view(1, 8, 1, 1, 1) + torch.arange(8.0).view(1, 8, 1, 1, 1)
    assert decorrelation_loss(collapsed).item() == pytest.approx(1.0, abs=1e-4)  # one signal up to scale and offset
    half = torch.cat([signal.expand(2, 4, 16, 16, 16), torch.randn(2, 4, 16, 16, 16)], 1)
    assert decorrelation_loss(half).item() == pytest.approx(12 / 56, abs=0.01)  # 4*3 of 8*7 pairs correlated
    const = torch.zeros(1, 4, 4, 4, 4)
    assert torch.isfinite(decorrelation_loss(const))  # a constant channel has no correlation, not a NaN


def test_decorrelation_gradient_reaches_the_features_and_lowers_the_loss():
    from nnunet_gemini.losses import decorrelation_loss
    torch.manual_seed(1)
    base = torch.randn(1, 1, 8, 8, 8)
    feats = (base.expand(1, 4, 8, 8, 8) + 0.3 * torch.randn(1, 4, 8, 8, 8)).requires_grad_(True)
    loss = decorrelation_loss(feats)
    loss.backward()
    assert feats.grad is not None and feats.grad.abs().sum() > 0
    after = decorrelation_loss((feats - 0.5 * feats.grad / feats.grad.norm()).detach())
    assert after < loss.detach()
    with pytest.raises(ValueError, match=r"not \(B, C >= 2"):
        decorrelation_loss(torch.randn(1, 1, 4, 4, 4))
