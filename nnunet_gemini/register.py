"""gemini_register: register a moving image to a fixed image with a trained GEMINI deformer.

The deformer was trained on nnU-Net-preprocessed data, so registration runs there too:
  1. both images go through the plans' own preprocessor (`run_case`: transpose -> crop to
     nonzero -> resample to the configuration spacing -> normalise), exactly as in training;
  2. the preprocessed moving image is resampled onto the fixed image's preprocessed grid
     (align_corners=True trilinear), whole volumes, zero-padded to the network's divisibility;
  3. one network forward per image gives the last decoder stage's features; the deformer
     (moving, fixed) gives the raw field, turned into a displacement by GeminiStep (velocity ->
     scaling and squaring, or the displacement itself), so warp(moving, u) ~= fixed;
  4. every voxel p of the fixed ORIGINAL image is mapped through the inverse of nnU-Net's
     preprocessing (transpose, crop, resampling: nnU-Net resamples with the half-voxel
     convention c = (q + 0.5) * n_c / n_q - 0.5) onto the preprocessed grid, moved by u, and
     mapped back through the moving image's preprocessing to a point y(p) of the moving image
     in millimetres. The displacement field d(p) = y(p) - x(p) (physical (x, y, z) order, mm,
     ITK's convention: a point x of the fixed image corresponds to x + d(x) of the moving one)
     is written on the fixed image's original grid, and the moving image (linear) and label
     (nearest) are resampled with SimpleITK through exactly that field. So
     `sitk.Resample(moving, fixed, sitk.DisplacementFieldTransform(d), ...)` reproduces the
     written warped image.

Images are read with SimpleITK for their geometry, so the plans must use nnU-Net's SimpleITKIO
(the default for .nii.gz, .nrrd, .mha, ...) and a 3d configuration. The model (network, deformer,
plans) is loaded by nnunet_gemini.trained_model from a gemini_pretrain checkpoint or a trainer's
results folder.
"""
import argparse
import itertools
import json
import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence

import numpy as np

from nnunet_gemini.errors import GeminiUserError, run_cli

# loading a model from either checkpoint kind: nnunet_gemini.trained_model (its names stay importable here)
from nnunet_gemini.trained_model import RegistrationModel, load_from_pretrain_checkpoint, load_from_trainer_results

if TYPE_CHECKING:  # annotations only: the CLI imports torch where it is used
    import torch

__all__ = ["RegistrationModel", "load_from_pretrain_checkpoint", "load_from_trainer_results", "prepare_case",
           "case_features", "register_cases", "register_pair", "write_result", "folder_cases", "register_folder",
           "label_dice", "warp_with_field", "displacement_field_mm", "RegistrationResult", "main"]

OUTPUT_IMAGE = "warped_moving"          # + _XXXX<ending> per channel
OUTPUT_LABEL = "warped_moving_label"    # + <ending>
OUTPUT_FIELD = "displacement_mm"        # + <ending>, vector image, float32
OUTPUT_JSON = "registration.json"
PAIRS_JSON = "pairs.json"
_SLAB_VOXELS = 2 ** 22  # fixed-image voxels mapped per chunk (bounds memory on big volumes)


# ----------------------------------------------------------------------------- geometry
@dataclass
class _Geometry:
    """SimpleITK geometry of an image: index (x, y, z) -> origin + direction @ (spacing * index)."""
    origin: np.ndarray
    spacing: np.ndarray
    direction: np.ndarray

    @classmethod
    def of(cls, image) -> "_Geometry":
        d = image.GetDimension()
        return cls(np.asarray(image.GetOrigin(), float), np.asarray(image.GetSpacing(), float),
                   np.asarray(image.GetDirection(), float).reshape(d, d))

    def physical(self, index_xyz: np.ndarray) -> np.ndarray:
        """(..., 3) continuous sitk index -> (..., 3) physical point (mm)."""
        return self.origin + (index_xyz * self.spacing) @ self.direction.T


@dataclass
class _PreprocessedGrid:
    """How nnU-Net's preprocessing maps an original array index (numpy order) to the
    preprocessed grid: transpose_forward, crop (bbox), resampling (half-voxel convention)."""
    transpose_forward: Sequence[int]
    bbox_low: np.ndarray        # in transposed axes
    cropped_shape: np.ndarray   # shape_after_cropping_and_before_resampling
    shape: np.ndarray           # preprocessed shape

    @classmethod
    def of(cls, properties: dict, preprocessed_shape, transpose_forward) -> "_PreprocessedGrid":
        return cls(list(transpose_forward), np.asarray([b[0] for b in properties["bbox_used_for_cropping"]], float),
                   np.asarray(properties["shape_after_cropping_and_before_resampling"], float),
                   np.asarray(preprocessed_shape, float))

    def _scale(self) -> np.ndarray:
        return self.shape / self.cropped_shape

    def to_preprocessed(self, p: np.ndarray) -> np.ndarray:
        """(3, ...) original index -> (3, ...) preprocessed index."""
        t = p[self.transpose_forward]
        c = t - self.bbox_low.reshape(-1, *[1] * (p.ndim - 1))
        s = self._scale().reshape(-1, *[1] * (p.ndim - 1))
        return (c + 0.5) * s - 0.5

    def to_original(self, q: np.ndarray) -> np.ndarray:
        s = self._scale().reshape(-1, *[1] * (q.ndim - 1))
        t = (q + 0.5) / s - 0.5 + self.bbox_low.reshape(-1, *[1] * (q.ndim - 1))
        p = np.empty_like(t)
        p[self.transpose_forward] = t
        return p


# ----------------------------------------------------------------------------- one case
@dataclass
class _Case:
    """One image, preprocessed, with what its registration needs (features cached)."""
    files: List[str]
    data: "torch.Tensor"          # (C, *preprocessed shape) float32
    grid: _PreprocessedGrid
    images: list                  # SimpleITK images of the channel files (original geometry)
    features: Optional["torch.Tensor"] = field(default=None, repr=False)


def _read_sitk(path: str, what: str):
    import SimpleITK as sitk
    if not os.path.isfile(path):
        raise GeminiUserError(f"{what} {path} does not exist: check the path")
    try:
        image = sitk.ReadImage(path)
    except RuntimeError as e:
        raise GeminiUserError(f"{what} {path} cannot be read by SimpleITK ({str(e).strip().splitlines()[-1]}); "
                              f"convert it to .nii.gz, .nrrd or .mha") from None
    if image.GetDimension() != 3:
        raise GeminiUserError(f"{what} {path} is {image.GetDimension()}D; gemini_register registers 3D volumes")
    return image


def prepare_case(model: RegistrationModel, files: Sequence[str], what: str = "image") -> _Case:
    """Preprocess one image (its channel files) with the plans' preprocessor, as in training."""
    import torch
    files = [os.path.abspath(f) for f in files]
    images = [_read_sitk(f, what) for f in files]
    expected = len(model.dataset_json["channel_names"])
    if len(files) != expected:
        raise GeminiUserError(f"{what}: {len(files)} file(s) given ({', '.join(files)}) but the model takes "
                              f"{expected} channel(s) {model.dataset_json['channel_names']}: pass one file per "
                              f"channel, in channel order")
    if any(im.GetSize() != images[0].GetSize() for im in images):
        raise GeminiUserError(f"{what}: the channel files {files} differ in size; channels must share a grid")
    preprocessor = model.configuration_manager.preprocessor_class(verbose=False)
    data, _, properties = preprocessor.run_case(files, None, model.plans_manager, model.configuration_manager,
                                                model.dataset_json)
    grid = _PreprocessedGrid.of(properties, data.shape[1:], model.plans_manager.transpose_forward)
    return _Case(files, torch.from_numpy(np.ascontiguousarray(data)).float(), grid, images)


def _divisor(model: RegistrationModel) -> np.ndarray:
    strides = np.asarray(model.configuration_manager.network_arch_init_kwargs["strides"])
    return np.prod(strides, axis=0).astype(int)


def case_features(model: RegistrationModel, case: _Case, data=None):
    """Last-decoder-stage features (1, F, *shape) of one whole preprocessed volume; the volume
    is zero-padded (centred, like nnU-Net's pad_nd_image) to the network's divisibility."""
    import torch
    import torch.nn.functional as F

    from nnunet_gemini.network import DecoderFeatureTap

    x = case.data if data is None else data
    shape = np.asarray(x.shape[1:])
    target = np.ceil(shape / _divisor(model)).astype(int) * _divisor(model)
    before = (target - shape) // 2
    after = target - shape - before
    pad = [int(v) for pair in zip(before[::-1], after[::-1]) for v in pair]
    x = F.pad(x[None], pad).to(model.device)
    with torch.no_grad(), DecoderFeatureTap(model.network) as tap:
        model.network(x)
        f = tap.pop()
    crop = tuple(slice(int(b), int(b + s)) for b, s in zip(before, shape))
    return f[(slice(None), slice(None)) + crop].float()


def _resample_to(data, shape):
    """(C, *s) -> (C, *shape) trilinear, align_corners=True (identity when shapes match)."""
    import torch.nn.functional as F
    if tuple(data.shape[1:]) == tuple(shape):
        return data
    return F.interpolate(data[None], size=tuple(int(s) for s in shape), mode="trilinear", align_corners=True)[0]


def _sample_field(disp, q: np.ndarray) -> np.ndarray:
    """disp (1, 3, *S) sampled (trilinear, border) at preprocessed indices q (3, ...)."""
    import torch
    import torch.nn.functional as F
    S = np.asarray(disp.shape[2:], float)
    extent = np.maximum(S - 1, 1).reshape(-1, *[1] * (q.ndim - 1))
    norm = torch.from_numpy((2 * q / extent - 1).astype(np.float32))
    grid = norm.reshape(3, -1).T.flip(-1).reshape(1, 1, 1, -1, 3)
    out = F.grid_sample(disp.float().cpu(), grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out.reshape(3, *q.shape[1:]).double().numpy()


def displacement_field_mm(fixed: _Case, moving: _Case, disp) -> np.ndarray:
    """(Z, Y, X, 3) float32 ITK displacement (mm, physical x, y, z) on the fixed original grid:
    fixed point x -> moving point x + d(x), through nnU-Net's preprocessing of both images and
    the preprocessed-grid displacement `disp` (1, 3, *fixed preprocessed shape)."""
    ref = fixed.images[0]
    fixed_geom, moving_geom = _Geometry.of(ref), _Geometry.of(moving.images[0])
    shape_zyx = ref.GetSize()[::-1]
    to_moving = (np.maximum(moving.grid.shape - 1, 0) / np.maximum(fixed.grid.shape - 1, 1)).reshape(3, 1, 1, 1)
    out = np.empty((*shape_zyx, 3), np.float32)
    slab = max(1, _SLAB_VOXELS // int(np.prod(shape_zyx[1:])))
    for z0 in range(0, shape_zyx[0], slab):
        z = np.arange(z0, min(z0 + slab, shape_zyx[0]), dtype=float)
        p = np.stack(np.meshgrid(z, np.arange(shape_zyx[1], dtype=float), np.arange(shape_zyx[2], dtype=float),
                                 indexing="ij"))
        q = fixed.grid.to_preprocessed(p)
        r = (q + _sample_field(disp, q)) * to_moving     # fixed preprocessed -> moving preprocessed
        p_moving = moving.grid.to_original(r)
        y = moving_geom.physical(np.moveaxis(p_moving[::-1], 0, -1))
        x = fixed_geom.physical(np.moveaxis(p[::-1], 0, -1))
        out[z0:z0 + len(z)] = (y - x).astype(np.float32)
    return out


# ----------------------------------------------------------------------------- a pair
@dataclass
class RegistrationResult:
    warped_images: list               # SimpleITK images, one per channel, fixed geometry
    displacement_mm: object           # SimpleITK vector image (float32), fixed geometry
    folding_fraction: float           # on the preprocessed grid (Jacobian det <= 0)
    warped_label: object = None       # SimpleITK label image (nearest) or None
    dice: Optional[Dict[str, float]] = None  # per structure + "mean" (needs both labels)


def warp_with_field(image, reference, field_mm, interpolator, pixel_type=None):
    """SimpleITK resampling of `image` onto `reference` through an ITK displacement field."""
    import SimpleITK as sitk
    transform = sitk.DisplacementFieldTransform(sitk.Cast(field_mm, sitk.sitkVectorFloat64))
    return sitk.Resample(image, reference, transform, interpolator, 0.0,
                         image.GetPixelID() if pixel_type is None else pixel_type)


def label_dice(warped_label: np.ndarray, fixed_label: np.ndarray, labels: Dict[str, int]) -> Dict[str, float]:
    """Dice per foreground structure (NaN when absent from both) and 'mean' over the defined ones."""
    out = {}
    for name, value in labels.items():
        if isinstance(value, (list, tuple)) or int(value) == 0:
            continue  # region-based labels have no single value to compare
        a, b = warped_label == int(value), fixed_label == int(value)
        denominator = a.sum() + b.sum()
        out[name] = float(2 * np.logical_and(a, b).sum() / denominator) if denominator else float("nan")
    defined = [v for v in out.values() if not np.isnan(v)]
    out["mean"] = float(np.mean(defined)) if defined else float("nan")
    return out


def register_cases(model: RegistrationModel, moving: _Case, fixed: _Case, moving_label: Optional[str] = None,
                   fixed_label: Optional[str] = None) -> RegistrationResult:
    """Register prepared cases (features are computed once per case and cached on it)."""
    import SimpleITK as sitk
    import torch

    from nnunet_gemini.registration import folding_fraction

    # a case's cache holds the features on its own grid; a moving image of another shape is
    # resampled onto the fixed grid first, and its features there are not cached (they would
    # replace the ones the case needs as a fixed image)
    if fixed.features is None:
        fixed.features = case_features(model, fixed)
    if tuple(moving.data.shape[1:]) == tuple(fixed.data.shape[1:]):
        if moving.features is None:
            moving.features = case_features(model, moving)
        moving_features, moving_data = moving.features, moving.data
    else:
        moving_data = _resample_to(moving.data, fixed.data.shape[1:])
        moving_features = case_features(model, moving, moving_data)
    with torch.no_grad():  # the images too: a deformer may see them (its spec's input)
        images = [torch.as_tensor(d)[None].to(model.device).float() for d in (moving_data, fixed.data)]
        disp = model.step.fields(moving_features, fixed.features, *images)[0].float()
    field_mm = sitk.GetImageFromArray(displacement_field_mm(fixed, moving, disp), isVector=True)
    field_mm.CopyInformation(fixed.images[0])
    reference = fixed.images[0]
    warped = [warp_with_field(im, reference, field_mm, sitk.sitkLinear, sitk.sitkFloat32) for im in moving.images]
    result = RegistrationResult(warped, field_mm, float(folding_fraction(disp)))
    if moving_label is not None:
        result.warped_label = warp_with_field(_read_sitk(moving_label, "--moving_label"), reference, field_mm,
                                              sitk.sitkNearestNeighbor)
        if fixed_label is not None:
            result.dice = label_dice(sitk.GetArrayFromImage(result.warped_label),
                                     sitk.GetArrayFromImage(_read_sitk(fixed_label, "fixed label")),
                                     model.dataset_json["labels"])
    return result


def register_pair(model: RegistrationModel, moving_files: Sequence[str], fixed_files: Sequence[str],
                  moving_label: Optional[str] = None, fixed_label: Optional[str] = None) -> RegistrationResult:
    return register_cases(model, prepare_case(model, moving_files, "moving image (-m)"),
                          prepare_case(model, fixed_files, "fixed image (-f)"), moving_label, fixed_label)


def write_result(result: RegistrationResult, out_dir: str, file_ending: str, info: Optional[dict] = None) -> dict:
    """Write the warped image(s), label, displacement field and registration.json; returns the json."""
    import SimpleITK as sitk
    os.makedirs(out_dir, exist_ok=True)
    files = {"warped_images": [], "displacement_mm": os.path.join(out_dir, OUTPUT_FIELD + file_ending)}
    for c, image in enumerate(result.warped_images):
        files["warped_images"].append(os.path.join(out_dir, f"{OUTPUT_IMAGE}_{c:04d}{file_ending}"))
        sitk.WriteImage(image, files["warped_images"][-1], useCompression=True)
    sitk.WriteImage(result.displacement_mm, files["displacement_mm"], useCompression=True)
    if result.warped_label is not None:
        files["warped_label"] = os.path.join(out_dir, OUTPUT_LABEL + file_ending)
        sitk.WriteImage(result.warped_label, files["warped_label"], useCompression=True)
    report = dict(info or {}, folding_fraction=result.folding_fraction, dice=result.dice, outputs=files)
    with open(os.path.join(out_dir, OUTPUT_JSON), "w") as f:
        json.dump(report, f, indent=2)
    return report


def folder_cases(folder: str, file_ending: str, num_channels: int) -> Dict[str, List[str]]:
    """{case id: [channel files]} of an nnU-Net image folder (CASE_XXXX<ending>)."""
    from nnunet_gemini.datasets import scan_case_folder
    if not os.path.isdir(folder):
        raise GeminiUserError(f"--pairs_from_folder {folder} is not a folder")
    cases = scan_case_folder(folder, file_ending, num_channels)  # the naming rules (and errors) of imagesTr
    if len(cases) < 2:
        raise GeminiUserError(f"--pairs_from_folder {folder} holds {len(cases)} case(s) named "
                              f"CASE_XXXX{file_ending}; need at least 2 to form pairs")
    return cases


def register_folder(model: RegistrationModel, folder: str, labels_folder: Optional[str] = None,
                    out_dir: Optional[str] = None, write_images: bool = True) -> dict:
    """Every ordered pair (moving, fixed) of the cases in `folder`; with `labels_folder`
    (CASE<ending>) the warped-label Dice of each pair. Returns (and with out_dir writes
    pairs.json): {"pairs": [{moving, fixed, folding_fraction, dice}], "mean_dice", ...}."""
    ending = model.file_ending
    cases = folder_cases(folder, ending, len(model.dataset_json["channel_names"]))
    labels = None
    if labels_folder is not None:
        labels = {c: os.path.join(labels_folder, c + ending) for c in cases}
        missing = [p for p in labels.values() if not os.path.isfile(p)]
        if missing:
            raise GeminiUserError(f"--labels_folder {labels_folder} lacks {missing[:3]}: it needs one label "
                                  f"CASE{ending} per case of {folder}")
    prepared = {c: prepare_case(model, f, f"case {c}") for c, f in cases.items()}
    pairs = []
    for moving_id, fixed_id in itertools.permutations(cases, 2):
        result = register_cases(model, prepared[moving_id], prepared[fixed_id],
                                labels[moving_id] if labels else None, labels[fixed_id] if labels else None)
        entry = {"moving": moving_id, "fixed": fixed_id, "folding_fraction": result.folding_fraction,
                 "dice": result.dice}
        if out_dir is not None and write_images:
            write_result(result, os.path.join(out_dir, f"{moving_id}_to_{fixed_id}"), ending, entry)
        pairs.append(entry)
        print(f"{moving_id} -> {fixed_id}: folding fraction {result.folding_fraction:.5f}"
              + (f", warped-label Dice {result.dice['mean']:.4f}" if result.dice else ""), flush=True)
    summary = {"model": model.source, "deformation": model.deformation, "folder": os.path.abspath(folder),
               "labels_folder": labels_folder and os.path.abspath(labels_folder), "pairs": pairs,
               "mean_folding_fraction": float(np.mean([p["folding_fraction"] for p in pairs]))}
    if labels:
        summary["mean_dice"] = float(np.nanmean([p["dice"]["mean"] for p in pairs]))
        names = [k for k in pairs[0]["dice"] if k != "mean"]
        summary["mean_dice_per_structure"] = {k: float(np.nanmean([p["dice"][k] for p in pairs])) for k in names}
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, PAIRS_JSON), "w") as f:
            json.dump(summary, f, indent=2)
    return summary


# ----------------------------------------------------------------------------- CLI
def _main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="gemini_register", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Register a moving image to a fixed image with a trained GEMINI deformer (a gemini_pretrain "
                    "checkpoint or an nnUNetTrainerGEMINI results folder), on nnU-Net's preprocessing of the "
                    "fixed image. Writes, in the fixed image's original geometry: the warped moving image "
                    f"({OUTPUT_IMAGE}_XXXX), the warped moving label ({OUTPUT_LABEL}, nearest) and the "
                    f"displacement field in mm ({OUTPUT_FIELD}: ITK convention, fixed point x -> moving point "
                    "x + d(x); float32 vector image: sitk.DisplacementFieldTransform(sitk.Cast(d, "
                    "sitk.sitkVectorFloat64))), and prints the folding fraction.")
    p.add_argument("-m", nargs="+", metavar="FILE", help="moving image, one file per channel (CASE_0000, ...)")
    p.add_argument("-f", nargs="+", metavar="FILE", help="fixed image, one file per channel")
    p.add_argument("-o", required=True, help="output folder")
    p.add_argument("--moving_label", help="label image of the moving image (warped with nearest neighbour)")
    p.add_argument("--fixed_label", help="label image of the fixed image: reports warped-label Dice")
    p.add_argument("--pairs_from_folder", metavar="FOLDER",
                   help="register every ordered pair of the cases (CASE_XXXX<ending>) in FOLDER instead of -m/-f")
    p.add_argument("--labels_folder", help="with --pairs_from_folder: labels CASE<ending>, reports Dice per pair")
    p.add_argument("--json_only", action="store_true",
                   help="with --pairs_from_folder: write only pairs.json, not the images of every pair")
    src = p.add_argument_group("model (--checkpoint, or -d with the nnU-Net results folder)")
    src.add_argument("--checkpoint", help="gemini_pretrain checkpoint (e.g. .../GEMINIPretrain__nnUNetPlans__"
                                          "3d_fullres/fold_all/checkpoint_final.pth)")
    src.add_argument("-d", help="dataset id or name of an nnUNetTrainerGEMINI results folder")
    src.add_argument("-c", default="3d_fullres", help="configuration (with -d)")
    src.add_argument("-p", default="nnUNetPlans", help="plans identifier (with -d)")
    src.add_argument("-tr", default="nnUNetTrainerGEMINI", help="trainer (with -d)")
    src.add_argument("--fold", default="all", help="fold (with -d)")
    src.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint file name (with -d)")
    src.add_argument("--deformation", choices=("diffeomorphic", "displacement"),
                     help="deformer output, when the trainer checkpoint does not record it (with -d)")
    p.add_argument("-device", default=None, help="cpu|cuda|mps; default: cuda when available, else cpu")
    a = p.parse_args(argv)
    if (a.checkpoint is None) == (a.d is None):
        raise GeminiUserError("give exactly one model: --checkpoint FILE or -d DATASET (with -c/-p/-tr/--fold)")
    if a.pairs_from_folder is None and (not a.m or not a.f):
        raise GeminiUserError("give -m MOVING and -f FIXED image files, or --pairs_from_folder FOLDER")
    if a.pairs_from_folder is not None and (a.m or a.f or a.moving_label or a.fixed_label):
        raise GeminiUserError("--pairs_from_folder registers the folder's pairs: drop -m/-f/--moving_label/"
                              "--fixed_label (use --labels_folder for labels)")
    if a.fixed_label and not a.moving_label:
        raise GeminiUserError("--fixed_label needs --moving_label (Dice compares the warped moving label)")
    from nnunet_gemini.devices import resolve_device
    device = resolve_device(a.device)
    if a.checkpoint:
        model = load_from_pretrain_checkpoint(a.checkpoint, device)
    else:
        model = load_from_trainer_results(a.d, a.c, a.p, a.tr, a.fold, a.chk, a.deformation, device)
    if a.pairs_from_folder:
        summary = register_folder(model, a.pairs_from_folder, a.labels_folder, a.o, not a.json_only)
        print(f"{len(summary['pairs'])} pairs; mean folding fraction {summary['mean_folding_fraction']:.5f}"
              + (f"; mean warped-label Dice {summary['mean_dice']:.4f}" if "mean_dice" in summary else ""))
        print(f"wrote {os.path.join(a.o, PAIRS_JSON)}")
        return 0
    result = register_pair(model, a.m, a.f, a.moving_label, a.fixed_label)
    report = write_result(result, a.o, model.file_ending,
                          {"model": model.source, "deformation": model.deformation,
                           "moving": [os.path.abspath(x) for x in a.m], "fixed": [os.path.abspath(x) for x in a.f]})
    print(f"folding fraction (Jacobian det <= 0, preprocessed grid): {result.folding_fraction:.6f}")
    if result.dice:
        print("warped-label Dice: " + ", ".join(f"{k} {v:.4f}" for k, v in result.dice.items()))
    print(f"wrote {', '.join([*report['outputs']['warped_images'], report['outputs']['displacement_mm']])}")
    return 0


def main(argv=None):
    sys.exit(run_cli(_main, argv))


if __name__ == "__main__":
    main()
