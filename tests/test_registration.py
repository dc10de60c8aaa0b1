"""Exactness of warping, masks, integration, composition, Jacobians and field resizing."""
import math

import pytest
import torch

from nnunet_gemini.registration import (
    compose,
    folding_fraction,
    integrate_velocity,
    jacobian_determinant,
    resize_field,
    validity_mask,
    warp,
    warp_routed,
)

SHAPES = [(2, 3, 7, 9), (2, 2, 5, 8, 6)]


def _smooth_field(shape, amplitude, generator):
    """Band-limited random field (B, d, *spatial) with max |v| = amplitude."""
    b, spatial = shape[0], shape[2:]
    coarse = torch.randn((b, len(spatial)) + (3,) * len(spatial), generator=generator)
    mode = "bilinear" if len(spatial) == 2 else "trilinear"
    v = torch.nn.functional.interpolate(coarse, size=spatial, mode=mode, align_corners=True)
    return v * amplitude / v.abs().max()


@pytest.mark.parametrize("shape", SHAPES)
def test_zero_field_is_identity(shape):
    x = torch.randn(shape)
    zero = torch.zeros((shape[0], len(shape) - 2) + shape[2:])
    assert torch.equal(warp(x, zero, mode="nearest"), x)
    assert torch.allclose(warp(x, zero), x, atol=1e-5, rtol=0)
    labels = torch.randint(0, 5, shape)
    out = warp(labels, zero, mode="nearest")
    assert out.dtype == labels.dtype and torch.equal(out, labels)
    assert torch.equal(validity_mask(zero), torch.ones((shape[0], 1) + shape[2:]))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_integer_shift_moves_content(shape, axis):
    ndim = len(shape) - 2
    axis = axis % ndim
    x = torch.randn(shape)
    disp = torch.zeros((shape[0], ndim) + shape[2:])
    disp[:, axis] = 2.0
    n = shape[2 + axis]
    for mode in ("linear", "nearest"):
        out = warp(x, disp, mode=mode)
        interior = out.narrow(2 + axis, 0, n - 2)
        assert torch.allclose(interior, x.narrow(2 + axis, 2, n - 2), atol=1e-5, rtol=0)
        assert torch.equal(out.narrow(2 + axis, n - 2, 2), torch.zeros_like(out.narrow(2 + axis, n - 2, 2)))
    mask = validity_mask(disp)
    assert torch.equal(mask.narrow(2 + axis, 0, n - 2), torch.ones_like(mask.narrow(2 + axis, 0, n - 2)))
    assert mask.narrow(2 + axis, n - 2, 2).sum() == 0


def test_fractional_shift_interpolates_linearly():
    x = torch.arange(8.0).view(1, 1, 8, 1).expand(1, 1, 8, 3).contiguous()
    disp = torch.zeros(1, 2, 8, 3)
    disp[:, 0] = 0.25
    out = warp(x, disp)
    assert torch.allclose(out[0, 0, :7], x[0, 0, :7] + 0.25, atol=1e-5)


def test_size_one_axis_is_finite_and_identity():
    x = torch.randn(2, 1, 1, 6, 5)
    zero = torch.zeros(2, 3, 1, 6, 5)
    assert torch.equal(warp(x, zero, mode="nearest"), x)
    assert torch.allclose(warp(x, zero), x, atol=1e-5)
    assert torch.equal(jacobian_determinant(zero), torch.ones(2, 1, 6, 5))


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="one channel per spatial axis"):
        warp(torch.zeros(1, 1, 4, 4), torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="share batch size and spatial shape"):
        warp(torch.zeros(1, 1, 4, 4), torch.zeros(1, 2, 4, 5))
    with pytest.raises(ValueError, match="mode"):
        warp(torch.zeros(1, 1, 4, 4), torch.zeros(1, 2, 4, 4), mode="cubic")


@pytest.mark.parametrize("shape", [(2, 2, 24, 20), (1, 3, 14, 16, 12)])
def test_scaling_and_squaring_inverse_is_near_identity(shape):
    # bound: for max |v| <= 1 voxel and a smooth field, exp(v) o exp(-v) is the identity to < 0.05 voxel
    g = torch.Generator().manual_seed(0)
    vel = _smooth_field(shape, 1.0, g)
    forward, backward = integrate_velocity(vel), integrate_velocity(-vel)
    residual = compose(forward, backward)
    interior = residual[(slice(None), slice(None)) + (slice(2, -2),) * (len(shape) - 2)]
    assert interior.abs().max() < 0.05
    assert forward.abs().max() > 0.5  # the test is not vacuous
    assert folding_fraction(forward) == 0


def test_compose_matches_sequential_warps():
    g = torch.Generator().manual_seed(1)
    a = _smooth_field((1, 3, 16, 16, 16), 1.5, g)
    b = _smooth_field((1, 3, 16, 16, 16), 1.5, g)
    x = _smooth_field((1, 3, 16, 16, 16), 1.0, g)[:, :1]  # a smooth image, so linear interpolation is accurate
    one = warp(x, compose(a, b))
    two = warp(warp(x, a), b)
    inner = (slice(None), slice(None)) + (slice(4, -4),) * 3
    assert (one - two)[inner].abs().max() < 0.02


def test_integrate_zero_steps_is_identity_map():
    vel = torch.randn(1, 2, 5, 5)
    assert torch.equal(integrate_velocity(vel, steps=0), vel)


@pytest.mark.parametrize("shape", SHAPES)
def test_jacobian_of_zero_field_is_one(shape):
    zero = torch.zeros((shape[0], len(shape) - 2) + shape[2:])
    assert torch.equal(jacobian_determinant(zero), torch.ones((shape[0],) + shape[2:]))
    assert folding_fraction(zero) == 0


@pytest.mark.parametrize("spatial", [(9, 8), (7, 6, 5)])
def test_folding_field_is_detected(spatial):
    ndim = len(spatial)
    centre = (spatial[0] - 1) / 2
    x0 = torch.arange(spatial[0], dtype=torch.float32).view(-1, *([1] * (ndim - 1)))
    disp = torch.zeros((2, ndim) + spatial)
    disp[:, 0] = -2.0 * (x0 - centre)  # map x -> x - 2(x - c): orientation reversed along axis 0
    det = jacobian_determinant(disp)
    assert torch.allclose(det, -torch.ones_like(det), atol=1e-5)
    assert folding_fraction(disp) > 0.5


def test_affine_field_jacobian_is_exact():
    # u = A p  ->  det(I + A) everywhere (finite differences are exact on linear fields)
    A = torch.tensor([[0.1, 0.2, 0.0], [-0.1, 0.05, 0.3], [0.0, 0.1, -0.2]])
    p = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in (5, 6, 7)], indexing="ij"))
    disp = torch.einsum("ij,j...->i...", A, p).unsqueeze(0)
    expected = torch.linalg.det(torch.eye(3) + A)
    assert torch.allclose(jacobian_determinant(disp), expected.expand(1, 5, 6, 7), atol=1e-5)


def test_resize_field_keeps_physical_displacement():
    # a linear ramp field resampled with align_corners=True stays exactly linear; values rescale
    small = torch.zeros(1, 3, 5, 9, 4)
    small[:, 0] = 1.0  # one small-grid voxel along axis 0
    small[:, 1] = torch.linspace(-1, 1, 9).view(1, 9, 1)
    big = resize_field(small, (9, 17, 4))
    assert torch.allclose(big[:, 0], torch.full_like(big[:, 0], 2.0))  # (9-1)/(5-1) = 2
    assert torch.allclose(big[:, 1], 2.0 * torch.linspace(-1, 1, 17).view(1, 17, 1).expand(1, 9, 17, 4), atol=1e-5)
    assert torch.equal(big[:, 2], torch.zeros_like(big[:, 2]))
    # warping a sampled linear image: the big field moves the big image as the small one moves the small one
    img_small = torch.linspace(0, 1, 5).view(1, 1, 5, 1, 1).expand(1, 1, 5, 9, 4)
    img_big = torch.linspace(0, 1, 9).view(1, 1, 9, 1, 1).expand(1, 1, 9, 17, 4)
    moved_small = warp(img_small, small)
    moved_big = warp(img_big, big)
    assert math.isclose(moved_small[0, 0, 1, 4, 0].item(), moved_big[0, 0, 2, 8, 0].item(), abs_tol=1e-5)
    assert math.isclose(moved_small[0, 0, 1, 4, 0].item(), 0.5, abs_tol=1e-5)
    with pytest.raises(ValueError):
        resize_field(small, (4, 4))


def test_autocast_keeps_float32():
    x = torch.randn(1, 2, 6, 6, 6).bfloat16()
    disp = torch.zeros(1, 3, 6, 6, 6).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = warp(x, disp)
    assert out.dtype == torch.float32
    assert torch.allclose(out, x.float(), atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_routed_warp_is_warp_with_each_stop_gradient(shape):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(shape, generator=g).requires_grad_()
    disp = _smooth_field((shape[0], len(shape) - 2) + shape[2:], 2.0, g).requires_grad_()
    up_x, up_disp = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    to_x, to_disp = warp_routed(x, disp)
    assert torch.equal(to_x, warp(x, disp.detach())) and torch.equal(to_disp, warp(x.detach(), disp))
    got = torch.autograd.grad((to_x * up_x).sum() + (to_disp * up_disp).sum(), [x, disp])
    want = torch.autograd.grad((warp(x, disp.detach()) * up_x).sum() + (warp(x.detach(), disp) * up_disp).sum(),
                               [x, disp])
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # each copy reaches only its own input
    assert torch.autograd.grad(warp_routed(x, disp)[0].sum(), [x, disp], allow_unused=True)[1] is None
    assert torch.autograd.grad(warp_routed(x, disp)[1].sum(), [x, disp], allow_unused=True)[0] is None
    with pytest.raises(ValueError, match="spatial shape"):
        warp_routed(x[..., :-1], disp)
