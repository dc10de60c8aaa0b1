"""gemini_demo_dataset: a small SYNTHETIC nnU-Net raw dataset with real inter-subject correspondence.

One template anatomy (a body with an organ holding a lesion, a curved vessel and a cyst with
a wall) is defined by implicit shapes in millimetres. Each subject is the template seen through
a random smooth diffeomorphism (a smooth velocity field integrated by scaling and squaring,
composed with a small anisotropic scaling), so every subject point corresponds to a template
point the way anatomy corresponds across patients. Shapes are evaluated at the mapped points,
so labels are exact (no label interpolation). Intensity variation: per-tissue gain, global gain,
a smooth multiplicative bias field, partial-volume blur and Gaussian noise.

Array axes follow nnU-Net (the order nnU-Net reports shapes and spacings in plans); SimpleITK
stores them reversed (x, y, z), which `_write` handles.
"""
import argparse
import json
import os
import shutil
from typing import Optional, Sequence

import numpy as np
from scipy import ndimage

from nnunet_gemini.datasets import dataset_prefix, require_env_folder
from nnunet_gemini.errors import GeminiUserError, run_cli, warn_user

LABELS = {"background": 0, "organ": 1, "vessel": 2, "cyst_wall": 3, "lesion": 4}
FILE_ENDING = ".nii.gz"
DEFAULTS = dict(name="GeminiDemo", labeled=10, unlabeled=20, test=6, seed=0,
                shape=(40, 48, 48), spacing=(2.0, 1.0, 1.0))
# Stream ids of the three splits, so a case's content depends on (seed, split, index) only.
_SPLITS = {"imagesTr": 0, "imagesUnlabeled": 1, "imagesTs": 2}
# Deformation: velocity std (mm) at control points CONTROL_MM apart; 2**STEPS squarings.
VELOCITY_STD_MM = 2.0
CONTROL_MM = 16.0
SQUARING_STEPS = 6


def _bspline_basis(size, num_nodes):
    """(size, num_nodes) cubic B-spline weights; node spacing spreads num_nodes - 3 cells over size."""
    t = np.linspace(1, num_nodes - 2, size)[:, None] - np.arange(num_nodes)[None, :]
    a = np.abs(t)
    return np.where(a < 1, 2 / 3 - a ** 2 + a ** 3 / 2, np.where(a < 2, (2 - a) ** 3 / 6, 0.0))


def _smooth_random_field(rng, shape, spacing, control_mm, channels):
    """(channels, *shape) smooth Gaussian field with unit variance everywhere.

    Cubic B-spline with N(0,1) coefficients on a grid `control_mm` apart (C2-smooth), evaluated
    separably (three small matrix products), then divided by its pointwise standard deviation.
    """
    extent = np.asarray(shape) * np.asarray(spacing)
    nodes = [int(np.ceil(e / control_mm)) + 3 for e in extent]
    b0, b1, b2 = (_bspline_basis(s, n) for s, n in zip(shape, nodes))
    coefficients = rng.standard_normal([channels] + nodes)
    field = np.einsum("ai,bj,ck,nijk->nabc", b0, b1, b2, coefficients, optimize=True)
    std = np.sqrt(np.einsum("a,b,c->abc", *((b ** 2).sum(1) for b in (b0, b1, b2))))
    return field / std


def _linear_resize_matrix(size_out, size_in):
    """(size_out, size_in) linear interpolation weights; both grids span the same extent."""
    position = np.linspace(0, size_in - 1, size_out)
    low = np.minimum(np.floor(position).astype(np.int64), max(size_in - 2, 0))
    weights = np.zeros((size_out, size_in))
    weights[np.arange(size_out), low] = 1 - (position - low)
    weights[np.arange(size_out), np.minimum(low + 1, size_in - 1)] += position - low
    return weights


def _integrate_velocity(velocity_mm, spacing, steps):
    """Displacement (mm) of exp(velocity) by scaling and squaring: u <- u + u(x + u)."""
    spacing = np.asarray(spacing).reshape(3, 1, 1, 1)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in velocity_mm.shape[1:]], indexing="ij"))
    disp = velocity_mm / 2 ** steps
    for _ in range(steps):
        at = grid + disp / spacing  # sample positions in voxels
        disp = disp + np.stack([ndimage.map_coordinates(d, at, order=1, mode="nearest") for d in disp])
    return disp


def subject_to_template_mm(rng, shape, spacing):
    """Template coordinates (mm, origin at the volume centre) of every subject voxel: (3, *shape).

    The deformation is integrated on a grid of half the resolution (it is smooth on a scale of
    CONTROL_MM) and resized linearly, which keeps generation fast.
    """
    shape, spacing = np.asarray(shape), np.asarray(spacing, dtype=np.float64)
    coarse_shape = np.maximum((shape + 1) // 2, 2)
    coarse_spacing = spacing * (shape - 1) / (coarse_shape - 1)
    velocity = VELOCITY_STD_MM * _smooth_random_field(rng, coarse_shape, coarse_spacing, CONTROL_MM, 3)
    coarse_disp = _integrate_velocity(velocity, coarse_spacing, SQUARING_STEPS)
    resize = [_linear_resize_matrix(s, c) for s, c in zip(shape, coarse_shape)]
    disp = np.einsum("ai,bj,ck,nijk->nabc", *resize, coarse_disp, optimize=True)
    centre = (shape - 1) / 2
    axes = [(np.arange(s) - c) * d for s, c, d in zip(shape, centre, spacing)]
    points = np.stack(np.meshgrid(*axes, indexing="ij")) + disp
    scale = rng.uniform(0.94, 1.06, size=3).reshape(3, 1, 1, 1)  # global size variation
    return points * scale


def template_anatomy(points_mm, shape, spacing):
    """(label map uint8, tissue index map) of the template evaluated at `points_mm` (3, *shape)."""
    half = np.asarray(shape) * np.asarray(spacing) / 2
    unit = half.min()  # radii scale with the smallest half-extent so the layout fits any shape
    q = points_mm / half.reshape(3, 1, 1, 1)  # normalised coordinates, body fits in [-1, 1]

    def ellipsoid(centre, radii):
        return sum(((q[i] - centre[i]) / radii[i]) ** 2 for i in range(3)) <= 1

    def distance_mm(centre):
        return np.sqrt(sum((points_mm[i] - centre[i] * half[i]) ** 2 for i in range(3)))

    body = ellipsoid((0, 0, 0), (0.9, 0.85, 0.8))
    organ = ellipsoid((0.1, -0.3, 0.15), (0.5, 0.4, 0.45)) & body
    # vessel: a tube whose centre line bends along axis 0
    centre_1 = (0.42 + 0.15 * np.sin(np.pi * q[0])) * half[1]
    centre_2 = (0.3 - 0.1 * q[0]) * half[2]
    vessel = (np.hypot(points_mm[1] - centre_1, points_mm[2] - centre_2) <= 0.16 * unit) \
        & (np.abs(q[0]) <= 0.75)
    cyst_distance = distance_mm((-0.45, 0.3, -0.4))
    cyst_wall = (cyst_distance <= 0.38 * unit) & (cyst_distance >= 0.24 * unit)
    cyst_inside = cyst_distance < 0.24 * unit
    lesion = distance_mm((0.2, -0.35, 0.2)) <= 0.2 * unit

    labels = np.zeros(shape, dtype=np.uint8)
    tissue = np.zeros(shape, dtype=np.int64)  # index into TISSUE_INTENSITY
    for mask, label, tissue_index in ((body, 0, 1), (organ, 1, 2), (vessel, 2, 3),
                                      (cyst_inside, 0, 4), (cyst_wall, 3, 5), (lesion, 4, 6)):
        labels[mask] = label
        tissue[mask] = tissue_index
    return labels, tissue


# air, body, organ, vessel, cyst fluid, cyst wall, lesion (relative MR-like intensities)
TISSUE_INTENSITY = np.array([0.0, 0.35, 0.6, 1.0, 0.15, 0.8, 0.3])


def make_subject(seed: int, split: int, index: int, shape, spacing):
    """(image float32, labels uint8) of one subject; a pure function of its arguments."""
    rng = np.random.default_rng([seed, split, index])
    labels, tissue = template_anatomy(subject_to_template_mm(rng, shape, spacing), shape, spacing)
    intensity = TISSUE_INTENSITY * rng.uniform(0.9, 1.1, size=TISSUE_INTENSITY.shape)
    image = intensity[tissue] * rng.uniform(0.8, 1.25)
    image = ndimage.gaussian_filter(image, sigma=0.6 / np.asarray(spacing))  # partial volume
    bias = np.exp(0.2 * _smooth_random_field(rng, shape, spacing, 40.0, 1)[0])
    image = image * bias + rng.normal(0, 0.04, size=shape)
    return (1000 * image).astype(np.float32), labels


def _write(array, spacing, path):
    import SimpleITK as sitk
    image = sitk.GetImageFromArray(array)  # numpy (a0, a1, a2) -> ITK (x=a2, y=a1, z=a0)
    image.SetSpacing([float(s) for s in spacing[::-1]])
    image.SetOrigin((0.0, 0.0, 0.0))
    image.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(image, path, useCompression=True)


def _existing_folders(raw_root, dataset_id):
    if not os.path.isdir(raw_root):
        return []
    return sorted(os.path.join(raw_root, d) for d in os.listdir(raw_root)
                  if d.startswith(dataset_prefix(dataset_id)) and os.path.isdir(os.path.join(raw_root, d)))


def make_demo_dataset(dataset_id: int, name: str = DEFAULTS["name"], labeled: int = DEFAULTS["labeled"],
                      unlabeled: int = DEFAULTS["unlabeled"], test: int = DEFAULTS["test"],
                      seed: int = DEFAULTS["seed"], shape: Sequence[int] = DEFAULTS["shape"],
                      spacing: Sequence[float] = DEFAULTS["spacing"], overwrite: bool = False,
                      raw_root: Optional[str] = None) -> str:
    """Write the demo dataset to raw_root (default $nnUNet_raw)/DatasetXXX_name; returns that folder."""
    if not 1 <= dataset_id <= 999:
        raise GeminiUserError(f"-d {dataset_id}: nnU-Net dataset ids are 1 to 999")
    if labeled < 1 or unlabeled < 0 or test < 0:
        raise GeminiUserError("--labeled must be >= 1, --unlabeled and --test >= 0")
    if len(shape) != 3 or min(shape) < 8 or len(spacing) != 3 or min(spacing) <= 0:
        raise GeminiUserError("--shape takes 3 sizes >= 8 and --spacing 3 positive values (mm)")
    if not name.replace("_", "").isalnum():
        raise GeminiUserError(f"--name {name!r}: use letters, digits and underscores only")
    shape, spacing = tuple(int(s) for s in shape), tuple(float(s) for s in spacing)
    raw_root = raw_root or require_env_folder("nnUNet_raw", must_exist=False)
    existing = _existing_folders(raw_root, dataset_id)
    if existing and not overwrite:
        raise GeminiUserError(f"dataset id {dataset_id} already exists ({', '.join(existing)}): "
                              f"choose another -d or pass --overwrite to replace it")
    for folder in existing:
        shutil.rmtree(folder)
    if existing:
        _warn_stale_outputs(dataset_id)
    folder = os.path.join(raw_root, f"{dataset_prefix(dataset_id)}{name}")
    counts = {"imagesTr": labeled, "imagesUnlabeled": unlabeled, "imagesTs": test}
    case_prefix = {"imagesTr": "", "imagesUnlabeled": "U", "imagesTs": "T"}
    for images_dir, n in counts.items():
        os.makedirs(os.path.join(folder, images_dir), exist_ok=True)
        labels_dir = {"imagesTr": "labelsTr", "imagesTs": "labelsTs"}.get(images_dir)
        if labels_dir:
            os.makedirs(os.path.join(folder, labels_dir), exist_ok=True)
        for i in range(n):
            case = f"{name}_{case_prefix[images_dir]}{i:03d}"
            image, labels = make_subject(seed, _SPLITS[images_dir], i, shape, spacing)
            _write(image, spacing, os.path.join(folder, images_dir, f"{case}_0000{FILE_ENDING}"))
            if labels_dir:  # unlabelled cases get no label file at all
                _write(labels, spacing, os.path.join(folder, labels_dir, case + FILE_ENDING))
    dataset_json = {
        "name": name,
        "description": "SYNTHETIC demo data from gemini_demo_dataset (procedural anatomy under "
                       "random smooth diffeomorphisms); not real patients.",
        "channel_names": {"0": "MR"},  # z-score normalisation suits the bias field and gains
        "labels": LABELS,
        "numTraining": labeled,
        "file_ending": FILE_ENDING,
        "gemini_demo": {"seed": seed, "shape": list(shape), "spacing": list(spacing),
                        "labeled": labeled, "unlabeled": unlabeled, "test": test},
    }
    with open(os.path.join(folder, "dataset.json"), "w", encoding="utf-8") as f:
        json.dump(dataset_json, f, indent=2)
    return folder


def _warn_stale_outputs(dataset_id):
    for var in ("nnUNet_preprocessed", "nnUNet_results"):
        root = os.environ.get(var)
        for old in _existing_folders(root, dataset_id) if root else []:
            warn_user(f"{old} belongs to the replaced dataset: rerun nnUNetv2_plan_and_preprocess "
                      f"-d {dataset_id} --clean (and retrain) before using it")


def _main(argv=None):
    parser = argparse.ArgumentParser(
        prog="gemini_demo_dataset", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Write a small SYNTHETIC nnU-Net raw dataset to $nnUNet_raw/DatasetXXX_NAME: "
                    "dataset.json, imagesTr/labelsTr, imagesUnlabeled/, imagesTs/labelsTs. Each "
                    "subject is a random smooth invertible deformation of one template anatomy "
                    f"(labels {', '.join(f'{v}={k}' for k, v in LABELS.items())}).")
    parser.add_argument("-d", type=int, required=True, help="dataset id (1-999)")
    parser.add_argument("--name", default=DEFAULTS["name"], help="dataset name after DatasetXXX_")
    parser.add_argument("--labeled", type=int, default=DEFAULTS["labeled"],
                        help="labelled cases (imagesTr + labelsTr)")
    parser.add_argument("--unlabeled", type=int, default=DEFAULTS["unlabeled"],
                        help="unlabelled cases (imagesUnlabeled/)")
    parser.add_argument("--test", type=int, default=DEFAULTS["test"],
                        help="test cases (imagesTs + labelsTs)")
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"],
                        help="random seed; the same seed writes identical files")
    parser.add_argument("--shape", type=int, nargs=3, default=list(DEFAULTS["shape"]), metavar=("X", "Y", "Z"),
                        help="voxels per axis, in nnU-Net's array order")
    parser.add_argument("--spacing", type=float, nargs=3, default=list(DEFAULTS["spacing"]),
                        metavar=("SX", "SY", "SZ"), help="voxel spacing in mm, same axis order as --shape")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing dataset with this id in nnUNet_raw")
    args = parser.parse_args(argv)
    folder = make_demo_dataset(args.d, name=args.name, labeled=args.labeled, unlabeled=args.unlabeled,
                               test=args.test, seed=args.seed, shape=args.shape, spacing=args.spacing,
                               overwrite=args.overwrite)
    print(f"wrote {folder}: {args.labeled} labelled, {args.unlabeled} unlabelled, {args.test} test "
          f"cases, shape {tuple(args.shape)}, spacing {tuple(args.spacing)} mm (synthetic)")
    print(f"next: nnUNetv2_plan_and_preprocess -d {args.d} --verify_dataset_integrity")


def main(argv=None):
    raise SystemExit(run_cli(_main, argv))


if __name__ == "__main__":
    main()
