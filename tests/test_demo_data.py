"""Demo dataset: determinism, content, geometry, invertible deformations, nnU-Net integrity."""
import hashlib
import json
import os

import numpy as np
import pytest

from nnunet_gemini.demo_data import LABELS, make_demo_dataset, make_subject, subject_to_template_mm, template_anatomy
from nnunet_gemini.errors import GeminiUserError

SHAPE, SPACING = (20, 24, 28), (2.0, 1.0, 1.5)


def _read(path):
    import SimpleITK as sitk
    image = sitk.ReadImage(path)
    return image, sitk.GetArrayFromImage(image)


def _digests(folder):
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                out[os.path.relpath(os.path.join(dirpath, f), folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.fixture
def small_kwargs():
    return dict(labeled=3, unlabeled=2, test=1, shape=SHAPE, spacing=SPACING)


def test_layout_dataset_json_and_geometry(tmp_path, small_kwargs):
    folder = make_demo_dataset(12, name="Demo", raw_root=str(tmp_path), **small_kwargs)
    assert folder == os.path.join(str(tmp_path), "Dataset012_Demo")
    listing = {d: sorted(os.listdir(os.path.join(folder, d)))
               for d in ("imagesTr", "labelsTr", "imagesUnlabeled", "imagesTs", "labelsTs")}
    assert listing["imagesTr"] == [f"Demo_{i:03d}_0000.nii.gz" for i in range(3)]
    assert listing["labelsTr"] == [f"Demo_{i:03d}.nii.gz" for i in range(3)]
    assert listing["imagesUnlabeled"] == ["Demo_U000_0000.nii.gz", "Demo_U001_0000.nii.gz"]
    assert listing["imagesTs"] == ["Demo_T000_0000.nii.gz"] and listing["labelsTs"] == ["Demo_T000.nii.gz"]
    with open(os.path.join(folder, "dataset.json")) as f:
        dataset_json = json.load(f)
    assert dataset_json["numTraining"] == 3 and dataset_json["file_ending"] == ".nii.gz"
    assert dataset_json["labels"] == LABELS and dataset_json["channel_names"] == {"0": "MR"}
    image, array = _read(os.path.join(folder, "imagesTr", "Demo_000_0000.nii.gz"))
    label_image, labels = _read(os.path.join(folder, "labelsTr", "Demo_000.nii.gz"))
    # nnU-Net's SimpleITK reader reverses ITK's (x, y, z) into our array order
    assert array.shape == SHAPE and labels.shape == SHAPE
    assert image.GetSpacing() == SPACING[::-1] and label_image.GetSpacing() == SPACING[::-1]
    assert image.GetOrigin() == label_image.GetOrigin() == (0.0, 0.0, 0.0)
    assert array.dtype == np.float32
    assert set(np.unique(labels).tolist()) == set(LABELS.values())


def test_same_seed_bit_identical_files_other_seed_differs(tmp_path, small_kwargs):
    a = make_demo_dataset(1, raw_root=str(tmp_path / "a"), seed=7, **small_kwargs)
    b = make_demo_dataset(1, raw_root=str(tmp_path / "b"), seed=7, **small_kwargs)
    c = make_demo_dataset(1, raw_root=str(tmp_path / "c"), seed=8, **small_kwargs)
    assert _digests(a) == _digests(b)
    _, image_a = _read(os.path.join(a, "imagesTr", "GeminiDemo_000_0000.nii.gz"))
    _, image_c = _read(os.path.join(c, "imagesTr", "GeminiDemo_000_0000.nii.gz"))
    _, labels_a = _read(os.path.join(a, "labelsTr", "GeminiDemo_000.nii.gz"))
    _, labels_c = _read(os.path.join(c, "labelsTr", "GeminiDemo_000.nii.gz"))
    assert not np.array_equal(image_a, image_c) and not np.array_equal(labels_a, labels_c)


def test_subjects_differ_and_every_structure_is_present():
    volumes = []
    for index in range(6):
        image, labels = make_subject(0, 0, index, SHAPE, SPACING)
        counts = np.bincount(labels.ravel(), minlength=len(LABELS))
        assert len(counts) == len(LABELS) and (counts[1:] > 0).all(), counts
        volumes.append(counts[1:])
    volumes = np.array(volumes, dtype=float)
    # inter-subject variation exists but stays anatomical (same template, bounded deformation)
    assert (volumes.std(0) > 0).all()
    assert (volumes.max(0) / volumes.min(0) < 3).all(), volumes


def test_deformation_is_smooth_and_invertible():
    """Positive Jacobian determinant everywhere (no folding) and bounded compression."""
    spacing = np.array(SPACING)
    for index in range(4):
        points = subject_to_template_mm(np.random.default_rng([3, 0, index]), SHAPE, SPACING)
        grads = [np.gradient(points[i], *spacing) for i in range(3)]
        jacobian = np.moveaxis(np.array(grads), (0, 1), (-2, -1))
        det = np.linalg.det(jacobian)
        assert det.min() > 0.2 and det.max() < 4, (det.min(), det.max())
        # identity + deformation: the map moves points by a few mm, not across the body
        centre = (np.array(SHAPE) - 1) / 2
        grid = np.stack(np.meshgrid(*[(np.arange(s) - c) * d for s, c, d in zip(SHAPE, centre, spacing)],
                                    indexing="ij"))
        assert 0.5 < np.abs(points - grid).max() < 12


def test_template_without_deformation_has_expected_layout():
    centre = (np.array(SHAPE) - 1) / 2
    grid = np.stack(np.meshgrid(*[(np.arange(s) - c) * d for s, c, d in zip(SHAPE, centre, SPACING)],
                                indexing="ij"))
    labels, tissue = template_anatomy(grid, SHAPE, SPACING)
    assert labels[0, 0, 0] == 0 and tissue[0, 0, 0] == 0  # air in the corner
    assert tissue[tuple(s // 2 for s in SHAPE)] > 0  # body in the centre
    assert (labels[tissue == 6] == 4).all()  # lesion tissue carries the lesion label


def test_existing_id_refused_without_overwrite(tmp_path, small_kwargs):
    raw = str(tmp_path)
    os.makedirs(os.path.join(raw, "Dataset005_Other"))
    with pytest.raises(GeminiUserError, match="Dataset005_Other.*--overwrite"):
        make_demo_dataset(5, raw_root=raw, **small_kwargs)
    folder = make_demo_dataset(5, raw_root=raw, overwrite=True, **small_kwargs)
    assert sorted(os.listdir(raw)) == ["Dataset005_GeminiDemo"] and os.path.isdir(folder)


def test_cli_refuses_existing_id_and_missing_raw(tmp_path, monkeypatch, capsys):
    from nnunet_gemini.demo_data import main
    monkeypatch.delenv("nnUNet_raw", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["-d", "4"])
    assert exit_info.value.code == 2 and "nnUNet_raw" in capsys.readouterr().err
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    os.makedirs(tmp_path / "Dataset004_X")
    with pytest.raises(SystemExit) as exit_info:
        main(["-d", "4", "--labeled", "1", "--unlabeled", "0", "--test", "0", "--shape", "8", "8", "8"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Dataset004_X" in err and "--overwrite" in err


def test_help_states_defaults(capsys):
    from nnunet_gemini.demo_data import main
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for text in ("--labeled", "default: 10", "default: 20", "default: 6", "[40, 48, 48]", "[2.0, 1.0, 1.0]"):
        assert text in out, text


def test_planned_demo_passed_nnunet_integrity_check(planned_demo):
    """The session fixture ran nnUNetv2_plan_and_preprocess --verify_dataset_integrity on it."""
    out = planned_demo.plan_output
    assert "verify_dataset_integrity Done" in out
    assert "Error:" not in out and "mismatch" not in out and "only has label 0" not in out
    with open(os.path.join(planned_demo.preprocessed_folder, "nnUNetPlans.json")) as f:
        plans = json.load(f)
    assert {"2d", "3d_fullres"} <= set(plans["configurations"])
    assert plans["original_median_spacing_after_transp"] == [2.0, 1.0, 1.0]
    assert plans["original_median_shape_after_transp"] == [24, 32, 32]
    data = os.path.join(planned_demo.preprocessed_folder, plans["configurations"]["3d_fullres"]["data_identifier"])
    assert sorted(f for f in os.listdir(data) if f.endswith(".pkl")) == [
        f"GeminiTiny_{i:03d}.pkl" for i in range(4)]
