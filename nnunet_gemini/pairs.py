"""Inter-subject pair batches for GEMINI: two DIFFERENT cases per pair, patches at the same
relative position of each case (or independent positions, an ablation), ONE shared spatial
augmentation for both.

The shared augmentation is exact by construction: the pair is stacked as channels
[A channels, B channels] and goes through one batchgeneratorsv2 SpatialTransform + MirrorTransform
call, which draws one set of parameters per call. Intensity augmentation (nnU-Net's chain) is
then applied to A and B independently. Labels are never read into a batch.

The loader is a batchgenerators DataLoader like nnU-Net's nnUNetDataLoader, so it runs under
nnU-Net's SingleThreadedAugmenter / NonDetMultiThreadedAugmenter.
"""
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from batchgenerators.dataloading.data_loader import DataLoader
from batchgeneratorsv2.helpers.scalar_type import RandomScalar
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.pseudo2d import Convert2DTo3DTransform, Convert3DTo2DTransform
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from threadpoolctl import threadpool_limits

from nnunet_gemini.choices import PAIR_POSITIONS  # noqa: F401  (see choices: same | independent)
from nnunet_gemini.errors import GeminiUserError

# Released GEMINI augmentation: rotation up to +-20 degrees per axis, scale 0.75-1.25.
DEFAULT_ROTATION = (-20. / 360 * 2. * np.pi, 20. / 360 * 2. * np.pi)
DEFAULT_SCALING = (0.75, 1.25)


def require_two_cases(num_cases: int, pool_folder: Optional[str] = None, excluded: str = "",
                      dataset: Union[int, str] = "ID", alternative: str = "") -> None:
    """The one refusal of a pool with fewer than 2 usable cases (pairs are two different subjects):
    names the pool folder when known, how many usable cases it holds (and what was removed from it,
    `excluded`), and the fix; `alternative`: another way out the caller offers."""
    if num_cases >= 2:
        return
    pool = f"the unlabelled pool {pool_folder}" if pool_folder else "the unlabelled pool"
    raise GeminiUserError(
        f"{pool} holds {num_cases} usable case(s){excluded}; GEMINI pairs need at least 2 different cases: add "
        f"images to imagesUnlabeled/ (or pass gemini_pretrain --unlabeled_dir) and rebuild the pool with "
        f"`gemini_pretrain -d {dataset} --preprocess_only`{alternative}.")


def relative_start(shape: Sequence[int], patch_size: Sequence[int], u: Sequence[float]) -> List[int]:
    """start = round(u * (shape - patch)) per axis. For an axis smaller than the patch the start
    is negative (the image sits inside the patch, zero-padded around it, as nnU-Net pads)."""
    return [int(round(ui * (s - p))) for ui, s, p in zip(u, shape, patch_size)]


def crop_at_relative_position(data, patch_size: Sequence[int], u: Sequence[float]) -> np.ndarray:
    """Crop a (C, *spatial) array to (C, *patch_size) at relative position u in [0,1]^d; regions
    outside the image are zero (nnU-Net's image padding value)."""
    start = relative_start(data.shape[1:], patch_size, u)
    bbox = [[0, data.shape[0]]] + [[s, s + p] for s, p in zip(start, patch_size)]
    return crop_and_pad_nd(data, bbox, 0)


def build_shared_spatial_transforms(patch_size: Sequence[int],
                                    rotation: RandomScalar = DEFAULT_ROTATION,
                                    scaling: RandomScalar = DEFAULT_SCALING,
                                    p_rotation: float = 0.2, p_scaling: float = 0.2,
                                    mirror_axes: Optional[Tuple[int, ...]] = None,
                                    do_dummy_2d_data_aug: bool = False) -> BasicTransform:
    """The spatial part of nnUNetTrainer.get_training_transforms with GEMINI's ranges; applied to
    the channel-stacked pair, so A and B get the same parameters. Crops the centre to patch_size."""
    transforms: List[BasicTransform] = []
    if do_dummy_2d_data_aug:
        transforms.append(Convert3DTo2DTransform())
        patch_size_spatial = tuple(patch_size[1:])
    else:
        patch_size_spatial = tuple(patch_size)
    transforms.append(SpatialTransform(
        patch_size_spatial, patch_center_dist_from_border=0, random_crop=False,
        p_elastic_deform=0, p_rotation=p_rotation, rotation=rotation, p_scaling=p_scaling,
        scaling=scaling, p_synchronize_scaling_across_axes=1, bg_style_seg_sampling=False))
    if do_dummy_2d_data_aug:
        transforms.append(Convert2DTo3DTransform())
    if mirror_axes:
        transforms.append(MirrorTransform(allowed_axes=tuple(mirror_axes)))
    return ComposeTransforms(transforms)


def build_intensity_transforms(ignore_axes: Optional[Tuple[int, ...]] = None) -> BasicTransform:
    """nnUNetTrainer.get_training_transforms' intensity chain (same probabilities and ranges)."""
    return ComposeTransforms([
        RandomTransform(GaussianNoiseTransform(noise_variance=(0, 0.1), p_per_channel=1,
                                               synchronize_channels=True), apply_probability=0.1),
        RandomTransform(GaussianBlurTransform(blur_sigma=(0.5, 1.), synchronize_channels=False,
                                              synchronize_axes=False, p_per_channel=0.5,
                                              benchmark=True), apply_probability=0.2),
        RandomTransform(MultiplicativeBrightnessTransform(
            multiplier_range=BGContrast((0.75, 1.25)), synchronize_channels=False,
            p_per_channel=1), apply_probability=0.15),
        RandomTransform(ContrastTransform(contrast_range=BGContrast((0.75, 1.25)),
                                          preserve_range=True, synchronize_channels=False,
                                          p_per_channel=1), apply_probability=0.15),
        RandomTransform(SimulateLowResolutionTransform(
            scale=(0.5, 1), synchronize_channels=False, synchronize_axes=True,
            ignore_axes=ignore_axes, allowed_channels=None, p_per_channel=0.5),
            apply_probability=0.25),
        RandomTransform(GammaTransform(gamma=BGContrast((0.7, 1.5)), p_invert_image=1,
                                       synchronize_channels=False, p_per_channel=1,
                                       p_retain_stats=1), apply_probability=0.1),
        RandomTransform(GammaTransform(gamma=BGContrast((0.7, 1.5)), p_invert_image=0,
                                       synchronize_channels=False, p_per_channel=1,
                                       p_retain_stats=1), apply_probability=0.3),
    ])


def initial_patch_size(patch_size: Sequence[int], rotation: RandomScalar,
                       scaling: RandomScalar, do_dummy_2d_data_aug: bool = False) -> Tuple[int, ...]:
    """The larger patch cropped before the spatial transform so rotated/scaled corners hold
    image content (nnUNetTrainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size)."""
    from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
    if len(patch_size) == 2:  # 2D: in-plane rotation only, as nnU-Net does
        return tuple(int(i) for i in get_patch_size(patch_size, rotation, (0, 0), (0, 0), scaling))
    if do_dummy_2d_data_aug:  # anisotropic 3D: 2D augmentation of each slice, depth unchanged
        size = get_patch_size(patch_size[1:], rotation, (0, 0), (0, 0), scaling)
        return (int(patch_size[0]), *[int(i) for i in size])
    return tuple(int(i) for i in get_patch_size(patch_size, rotation, rotation, rotation, scaling))


class PairDataLoader(DataLoader):
    """Yields {"a": (P,C,*patch) float32, "b": (P,C,*patch) float32, "keys": [(case_a, case_b)]}.

    data: an nnU-Net dataset (load_case(identifier) -> (data, seg, seg_prev, properties),
    .identifiers), e.g. unlabeled.load_pool_dataset. Only `data` is read from each case.
    patch_size: the network's patch (2 or 3 entries). A 2D patch over 3D-stored data picks one
    slice per case at the same relative depth (as nnUNetDataLoader does with a pseudo-3D patch).
    """

    def __init__(self, data, num_pairs: int, patch_size: Sequence[int],
                 spatial_transforms: Optional[BasicTransform] = None,
                 intensity_transforms: Optional[BasicTransform] = None,
                 crop_size: Optional[Sequence[int]] = None, positions: str = "same"):
        if positions not in PAIR_POSITIONS:
            raise GeminiUserError(f"pair positions {positions!r} is not one of {PAIR_POSITIONS}")
        identifiers = list(data.identifiers)
        require_two_cases(len(identifiers), getattr(data, "source_folder", None))
        super().__init__(data, num_pairs, 1, None, True, False, True, None)
        self.indices = identifiers
        self.num_pairs = int(num_pairs)
        self.patch_size_was_2d = len(patch_size) == 2
        crop = tuple(crop_size) if crop_size is not None else tuple(patch_size)
        self.crop_size = (1, *crop) if self.patch_size_was_2d else crop
        self.spatial_transforms = spatial_transforms
        self.intensity_transforms = intensity_transforms
        self.positions = positions

    def _draw_pair(self) -> Tuple[str, str]:
        i, j = np.random.choice(len(self.indices), 2, replace=False)
        return self.indices[i], self.indices[j]

    def _load(self, key):
        data, _, _, _ = self._data.load_case(key)  # seg (the nonzero mask) is not used
        return data

    def generate_train_batch(self) -> dict:
        a_all = b_all = None
        keys = []
        with torch.no_grad(), threadpool_limits(limits=1, user_api=None):
            for p in range(self.num_pairs):
                key_a, key_b = self._draw_pair()
                keys.append((key_a, key_b))
                u_a = np.random.uniform(0, 1, size=len(self.crop_size))
                u_b = u_a if self.positions == "same" else np.random.uniform(0, 1, size=len(self.crop_size))
                crop_a = crop_at_relative_position(self._load(key_a), self.crop_size, u_a)
                crop_b = crop_at_relative_position(self._load(key_b), self.crop_size, u_b)
                a = torch.from_numpy(np.ascontiguousarray(crop_a)).float()
                b = torch.from_numpy(np.ascontiguousarray(crop_b)).float()
                if self.patch_size_was_2d:
                    a, b = a[:, 0], b[:, 0]
                if a.shape[0] != b.shape[0]:
                    raise GeminiUserError(f"pool cases {key_a} and {key_b} have different channel "
                                          f"counts ({a.shape[0]} vs {b.shape[0]}): rebuild the pool.")
                num_channels = a.shape[0]
                if self.spatial_transforms is not None:
                    # one call on the channel-stacked pair: one set of spatial parameters for both
                    stacked = self.spatial_transforms(image=torch.cat((a, b), 0))["image"]
                    a, b = stacked[:num_channels], stacked[num_channels:]
                if self.intensity_transforms is not None:
                    a = self.intensity_transforms(image=a.clone())["image"]
                    b = self.intensity_transforms(image=b.clone())["image"]
                if a_all is None:
                    a_all = torch.empty((self.num_pairs, *a.shape), dtype=torch.float32)
                    b_all = torch.empty((self.num_pairs, *b.shape), dtype=torch.float32)
                a_all[p], b_all[p] = a, b
        return {"a": a_all, "b": b_all, "keys": keys}


def make_pair_loader(dataset, num_pairs: int, patch_size: Sequence[int],
                     rotation: RandomScalar = DEFAULT_ROTATION,
                     scaling: RandomScalar = DEFAULT_SCALING,
                     p_rotation: float = 0.2, p_scaling: float = 0.2,
                     mirror_axes: Union[Tuple[int, ...], None, str] = "all",
                     do_dummy_2d_data_aug: bool = False, intensity_augmentation: bool = True,
                     num_workers: int = 0, num_cached: int = 6, pin_memory: bool = False,
                     spatial_augmentation: bool = True, positions: str = "same"):
    """An endless iterator of pair batches: SingleThreadedAugmenter for num_workers == 0,
    NonDetMultiThreadedAugmenter with num_workers processes otherwise (call ._finish() to stop).
    mirror_axes="all" mirrors along every spatial axis of the patch, None disables mirroring.
    positions: see PAIR_POSITIONS."""
    patch_size = tuple(int(i) for i in patch_size)
    if mirror_axes == "all":
        mirror_axes = tuple(range(len(patch_size)))
    if spatial_augmentation:
        spatial = build_shared_spatial_transforms(patch_size, rotation, scaling, p_rotation,
                                                  p_scaling, mirror_axes, do_dummy_2d_data_aug)
        crop = initial_patch_size(patch_size, rotation, scaling, do_dummy_2d_data_aug)
    else:
        spatial = ComposeTransforms([MirrorTransform(allowed_axes=mirror_axes)]) if mirror_axes \
            else None
        crop = patch_size
    intensity = build_intensity_transforms((0,) if do_dummy_2d_data_aug else None) \
        if intensity_augmentation else None
    loader = PairDataLoader(dataset, num_pairs, patch_size, spatial, intensity, crop_size=crop, positions=positions)
    from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
    from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
    if num_workers == 0:
        return SingleThreadedAugmenter(loader, None)
    return NonDetMultiThreadedAugmenter(loader, None, num_processes=num_workers,
                                        num_cached=max(num_cached, num_workers), seeds=None,
                                        pin_memory=pin_memory, wait_time=0.002)
