"""Inter-subject pair batches: different cases, same relative position, one shared spatial
augmentation, no labels."""
import numpy as np
import pytest
import torch

from nnunet_gemini.errors import GeminiUserError
from nnunet_gemini.pairs import crop_at_relative_position, make_pair_loader, relative_start


def crop_pair(a, b, patch, u):
    return crop_at_relative_position(a, patch, u), crop_at_relative_position(b, patch, u)


def test_crop_same_relative_position_known_arrays():
    a = np.arange(10 * 12 * 14, dtype=np.float32).reshape(1, 10, 12, 14) + 1
    b = np.arange(20 * 12 * 6, dtype=np.float32).reshape(1, 20, 12, 6) + 1
    u = (0.0, 0.5, 1.0)
    ca, cb = crop_pair(a, b, (4, 6, 8), u)
    assert relative_start(a.shape[1:], (4, 6, 8), u) == [0, 3, 6]
    np.testing.assert_array_equal(ca, a[:, 0:4, 3:9, 6:14])
    # b is 6 wide along z, the patch 8: start round(1 * (6 - 8)) = -2 -> two zero planes first
    assert cb.shape == (1, 4, 6, 8)
    np.testing.assert_array_equal(cb[..., 2:], b[:, 0:4, 3:9, :])
    assert (cb[..., :2] == 0).all()
    # u = 1 along x puts the patch at the far end of each case
    ca, cb = crop_pair(a, b, (4, 6, 6), (1.0, 0.0, 0.0))
    np.testing.assert_array_equal(ca, a[:, 6:10, 0:6, 0:6])
    np.testing.assert_array_equal(cb, b[:, 16:20, 0:6, 0:6])


class ArrayDataset:
    """The part of nnU-Net's dataset interface the loader uses, over in-memory arrays; the
    'seg' is a label that must never reach a batch."""

    def __init__(self, arrays):
        self.arrays = arrays
        self.identifiers = sorted(arrays)

    def load_case(self, key):
        data = self.arrays[key]
        return data, np.full((1, *data.shape[1:]), 7, np.int16), None, {"class_locations": {}}


def _coded_cases(shapes):
    """Case k: voxel value = 10000 * (k + 1) + its flat index, so a crop tells case and start."""
    return {f"c{k}": (10000 * (k + 1) + np.arange(np.prod(s))).reshape(1, *s).astype(np.float32)
            for k, s in enumerate(shapes)}


def _decode(patch, shape):
    first = int(patch.reshape(-1)[0])  # the crop's first voxel
    return first // 10000 - 1, np.unravel_index(first % 10000, shape)


def test_loader_pairs_different_cases_same_relative_position_no_labels():
    np.random.seed(0)
    shapes = [(12, 14, 10), (16, 14, 18), (10, 20, 12), (13, 13, 13)]
    arrays = _coded_cases(shapes)
    patch = (8, 8, 8)
    loader = make_pair_loader(ArrayDataset(arrays), num_pairs=3, patch_size=patch,
                              spatial_augmentation=False, mirror_axes=None,
                              intensity_augmentation=False)
    seen_pairs = set()
    for _ in range(10):
        batch = next(loader)
        assert set(batch) == {"a", "b", "keys"}  # no labels, no masks
        assert batch["a"].shape == (3, 1, 8, 8, 8) and batch["a"].dtype == torch.float32
        assert batch["b"].shape == (3, 1, 8, 8, 8)
        for p, (ka, kb) in enumerate(batch["keys"]):
            assert ka != kb
            seen_pairs.add((ka, kb))
            ia, start_a = _decode(batch["a"][p].numpy(), shapes[int(ka[1:])])
            ib, start_b = _decode(batch["b"][p].numpy(), shapes[int(kb[1:])])
            assert (f"c{ia}", f"c{ib}") == (ka, kb)
            # both starts come from one u: the u-intervals that round to each start overlap
            for d in range(3):
                ra, rb = shapes[ia][d] - patch[d], shapes[ib][d] - patch[d]
                lo = max((start_a[d] - 0.5) / ra, (start_b[d] - 0.5) / rb)
                hi = min((start_a[d] + 0.5) / ra, (start_b[d] + 0.5) / rb)
                assert lo <= hi + 1e-9, (d, start_a, start_b)
            np.testing.assert_array_equal(
                batch["a"][p, 0].numpy(),
                arrays[ka][0, start_a[0]:start_a[0] + 8, start_a[1]:start_a[1] + 8,
                           start_a[2]:start_a[2] + 8])
    assert len(seen_pairs) > 3  # pairs are drawn at random, not a fixed schedule


def test_independent_positions_break_the_correspondence_and_bad_value_is_refused():
    """positions="independent" (an ablation): starts no longer come from one u, in most pairs."""
    np.random.seed(1)
    shapes = [(30, 30, 30), (30, 30, 30), (30, 30, 30)]  # same shapes: same u <=> same start
    loader = make_pair_loader(ArrayDataset(_coded_cases(shapes)), num_pairs=4, patch_size=(8, 8, 8),
                              spatial_augmentation=False, mirror_axes=None, intensity_augmentation=False,
                              positions="independent")
    same = total = 0
    for _ in range(5):
        batch = next(loader)
        for p, (ka, kb) in enumerate(batch["keys"]):
            assert ka != kb
            start_a = _decode(batch["a"][p].numpy(), shapes[0])[1]
            start_b = _decode(batch["b"][p].numpy(), shapes[0])[1]
            same += start_a == start_b
            total += 1
    assert same <= 2 and total == 20  # 23^3 possible starts: a coincidence is rare
    with pytest.raises(GeminiUserError, match="pair positions 'random' is not one of"):
        make_pair_loader(ArrayDataset(_coded_cases(shapes)), 1, (8, 8, 8), positions="random")


def test_shared_spatial_augmentation_moves_both_identically():
    torch.manual_seed(0)
    np.random.seed(0)
    rng = np.random.default_rng(0)
    volume = rng.standard_normal((2, 14, 16, 12)).astype(np.float32)  # two channels
    dataset = ArrayDataset({f"c{k}": volume.copy() for k in range(3)})
    loader = make_pair_loader(dataset, num_pairs=2, patch_size=(8, 10, 8), p_rotation=1.0,
                              p_scaling=1.0, intensity_augmentation=False)
    unaugmented = make_pair_loader(dataset, num_pairs=2, patch_size=(8, 10, 8),
                                   spatial_augmentation=False, mirror_axes=None,
                                   intensity_augmentation=False)
    for _ in range(3):
        batch = next(loader)
        assert batch["a"].shape == (2, 2, 8, 10, 8)
        torch.testing.assert_close(batch["a"], batch["b"], rtol=0, atol=0)
        # and the augmentation did something: no unaugmented crop equals it
        plain = next(unaugmented)["a"][0]
        assert not torch.allclose(batch["a"][0], plain, atol=1e-3)


def test_intensity_augmentation_is_independent_per_image():
    torch.manual_seed(1)
    np.random.seed(1)
    volume = np.random.default_rng(1).standard_normal((1, 12, 12, 12)).astype(np.float32)
    dataset = ArrayDataset({f"c{k}": volume.copy() for k in range(2)})
    loader = make_pair_loader(dataset, num_pairs=4, patch_size=(8, 8, 8), p_rotation=1.0,
                              p_scaling=1.0)
    differs = [not torch.equal(b["a"], b["b"]) for b in (next(loader) for _ in range(5))]
    assert any(differs)


def test_2d_patch_on_3d_stored_cases():
    np.random.seed(2)
    shapes = [(5, 14, 12), (3, 12, 16), (4, 20, 10)]
    loader = make_pair_loader(ArrayDataset(_coded_cases(shapes)), num_pairs=2,
                              patch_size=(8, 8), num_workers=0)
    batch = next(loader)
    assert batch["a"].shape == (2, 1, 8, 8) and batch["b"].shape == (2, 1, 8, 8)
    assert all(ka != kb for ka, kb in batch["keys"])


def test_small_images_are_padded():
    np.random.seed(3)
    arrays = {f"c{k}": np.ones((1, 4, 5, 6), np.float32) * (k + 1) for k in range(2)}
    batch = next(make_pair_loader(ArrayDataset(arrays), 1, (8, 8, 8), spatial_augmentation=False,
                                  mirror_axes=None, intensity_augmentation=False))
    a = batch["a"][0, 0]
    assert a.shape == (8, 8, 8)
    assert int((a != 0).sum()) == 4 * 5 * 6  # the whole image, zero padding around it


def test_worker_processes():
    loader = make_pair_loader(ArrayDataset(_coded_cases([(10, 10, 10)] * 3)), 2, (6, 6, 6),
                              num_workers=1, num_cached=1)
    try:
        batch = next(loader)
        assert batch["a"].shape == (2, 1, 6, 6, 6)
        assert all(ka != kb for ka, kb in batch["keys"])
    finally:
        loader._finish()


def test_one_case_is_an_error():
    with pytest.raises(GeminiUserError, match="at least 2 different cases"):
        make_pair_loader(ArrayDataset(_coded_cases([(10, 10, 10)])), 1, (6, 6, 6))


def test_the_pool_needs_two_cases_one_wording():
    """One refusal for the pair loader, gemini_pretrain and the trainer: the pool folder (when known),
    the usable cases, what was removed, and the fix."""
    from nnunet_gemini.pairs import require_two_cases
    require_two_cases(2, "/pool")  # enough
    with pytest.raises(GeminiUserError) as e:
        require_two_cases(1, "/pool", excluded=" after removing this fold's validation cases", dataset=987,
                          alternative=", or train nnUNetTrainer")
    assert str(e.value) == ("the unlabelled pool /pool holds 1 usable case(s) after removing this fold's validation "
                            "cases; GEMINI pairs need at least 2 different cases: add images to imagesUnlabeled/ (or "
                            "pass gemini_pretrain --unlabeled_dir) and rebuild the pool with `gemini_pretrain -d 987 "
                            "--preprocess_only`, or train nnUNetTrainer.")
    with pytest.raises(GeminiUserError, match=r"^the unlabelled pool holds 0 usable case\(s\); .* -d ID "):
        require_two_cases(0)


def test_works_on_nnunet_blosc2_dataset(tmp_path):
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    from nnunet_gemini.unlabeled import load_pool_dataset
    rng = np.random.default_rng(4)
    for k in range(3):
        data = rng.standard_normal((1, 10, 11, 12)).astype(np.float32)
        seg = np.zeros((1, 10, 11, 12), np.int16)
        nnUNetDatasetBlosc2.save_case(data, seg, {"class_locations": {}}, str(tmp_path / f"u{k}"),
                                      chunks=(1, 10, 11, 12), blocks=(1, 8, 8, 8))
    batch = next(make_pair_loader(load_pool_dataset(str(tmp_path), ["u0", "u1", "u2"]), 2,
                                  (8, 8, 8)))
    assert batch["a"].shape == (2, 1, 8, 8, 8) and torch.isfinite(batch["a"]).all()
