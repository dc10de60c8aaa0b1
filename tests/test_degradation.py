"""Models-Genesis damage: range, shapes, target, randomness control, degenerate inputs."""
import pytest
import torch

from nnunet_gemini.degradation import minmax_rescale, models_genesis_damage


def _seeded(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("shape", [(3, 2, 20, 17, 11), (2, 1, 40, 33)])
def test_outputs_in_unit_range_with_rescaled_target(shape):
    x = 40.0 * torch.randn(shape, generator=_seeded(1)) - 300.0
    damaged, target = models_genesis_damage(x, _seeded(), p_shuffle=1, p_bezier=1, p_inpaint=1)
    assert damaged.shape == target.shape == x.shape
    assert damaged.dtype == target.dtype == torch.float32
    for t in (damaged, target):
        assert t.min() >= 0 and t.max() <= 1
    flat = x.flatten(2)
    lo, hi = flat.amin(2), flat.amax(2)
    pad = (..., None, None, *([None] * (x.ndim - 4)))
    expected = (x - lo[pad]) / (hi - lo)[pad]
    assert torch.allclose(target, expected, atol=1e-6)
    assert (damaged != target).float().mean() > 0.5


@pytest.mark.parametrize("which", ["p_shuffle", "p_bezier", "p_inpaint", "p_outpaint"])
def test_each_damage_changes_the_image_alone(which):
    x = torch.rand(2, 1, 24, 24, 12, generator=_seeded(2))
    probs = {"p_shuffle": 0.0, "p_bezier": 0.0, "p_inpaint": 0.0, which: 1.0}
    damaged, target = models_genesis_damage(x, _seeded(3), **probs)
    for sample in range(2):
        assert not torch.equal(damaged[sample], target[sample])


def test_shuffling_only_permutes_values():
    x = torch.rand(2, 2, 30, 30, generator=_seeded(4))
    damaged, target = models_genesis_damage(x, _seeded(5), p_shuffle=1, p_bezier=0, p_inpaint=0)
    for sample in range(2):  # one permutation per sample, shared by its channels
        moved = damaged[sample] != target[sample]
        assert moved.any() and torch.equal(moved[0], moved[1])
        assert torch.equal(damaged[sample].flatten(1).sort(1)[0], target[sample].flatten(1).sort(1)[0])


def test_no_damage_with_all_probabilities_zero():
    x = torch.randn(2, 1, 16, 16, 8)
    damaged, target = models_genesis_damage(x, _seeded(), 0, 0, 0, 0)
    assert torch.equal(damaged, target) and torch.equal(target, minmax_rescale(x))


def test_seeded_generator_is_deterministic():
    x = torch.randn(2, 1, 16, 16, 8)
    one, _ = models_genesis_damage(x, _seeded(7), 1, 1, 1)
    two, _ = models_genesis_damage(x, _seeded(7), 1, 1, 1)
    other, _ = models_genesis_damage(x, _seeded(8), 1, 1, 1)
    assert torch.equal(one, two) and not torch.equal(one, other)


def test_constant_input_gives_finite_output():
    x = torch.full((2, 1, 12, 12, 6), 3.5)
    damaged, target = models_genesis_damage(x, _seeded(), 1, 1, 1)
    assert torch.equal(target, torch.zeros_like(target))
    assert torch.isfinite(damaged).all() and damaged.min() >= 0 and damaged.max() <= 1


def test_bad_probabilities_are_rejected():
    with pytest.raises(ValueError, match="p_bezier"):
        models_genesis_damage(torch.rand(1, 1, 8, 8), p_bezier=1.5)
    with pytest.raises(ValueError, match="<= 1"):
        models_genesis_damage(torch.rand(1, 1, 8, 8), p_inpaint=0.6, p_outpaint=0.6)
