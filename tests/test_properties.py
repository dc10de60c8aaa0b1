"""Hypothesis property tests over random shapes (odd, anisotropic, 2D/3D, batch 1-3, 1-2 channels)."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nnunet_gemini.losses import local_ncc_loss, masked_cosine_loss, smoothness_loss
from nnunet_gemini.registration import folding_fraction, jacobian_determinant, validity_mask, warp


@st.composite
def volumes(draw):
    ndim = draw(st.sampled_from([2, 3]))
    spatial = tuple(draw(st.integers(1, 12)) for _ in range(ndim))
    batch, channels = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    seed = draw(st.integers(0, 2 ** 16))
    return (batch, channels) + spatial, seed


SETTINGS = settings(max_examples=25, deadline=None)


@SETTINGS
@given(volumes())
def test_zero_field_is_identity(case):
    shape, seed = case
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    zero = torch.zeros((shape[0], len(shape) - 2) + shape[2:])
    assert torch.equal(warp(x, zero, mode="nearest"), x)
    assert torch.allclose(warp(x, zero), x, atol=1e-5)
    assert torch.equal(validity_mask(zero), torch.ones((shape[0], 1) + shape[2:]))
    assert torch.equal(jacobian_determinant(zero), torch.ones((shape[0],) + shape[2:]))
    assert folding_fraction(zero) == 0


@SETTINGS
@given(volumes(), st.sampled_from([1, 3, 5, 9]))
def test_losses_are_finite_scalars(case, window):
    shape, seed = case
    g = torch.Generator().manual_seed(seed)
    i = torch.randn(shape, generator=g).requires_grad_()
    j = torch.randn(shape, generator=g)
    disp = (2 * torch.randn((shape[0], len(shape) - 2) + shape[2:], generator=g)).requires_grad_()
    warped = warp(i, disp)
    assert warped.shape == i.shape
    mask = validity_mask(disp)
    losses = [local_ncc_loss(warped, j, mask, window), masked_cosine_loss(warped, j, mask),
              smoothness_loss(disp), smoothness_loss(disp, "bending")]
    for loss in losses:
        assert loss.shape == () and torch.isfinite(loss)
    assert -1e-5 <= losses[0].item() <= 1 + 1e-5 and -1e-5 <= losses[1].item() <= 2 + 1e-5
    sum(losses).backward()
    assert torch.isfinite(i.grad).all() and torch.isfinite(disp.grad).all()
