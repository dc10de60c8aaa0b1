"""Unlabelled pool: discovery, validation (ERROR / WARN), preprocessing into the sibling folder,
incremental re-runs, loading with nnU-Net's dataset class."""
import os
import pickle
import shutil
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import private_demo_copy

from nnunet_gemini import unlabeled
from nnunet_gemini.errors import GeminiUserError


def write_image(array, path, spacing=(1.0, 1.0, 1.0)):
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing[:array.ndim])
    sitk.WriteImage(img, path)


def _blob(seed: int, shape=(20, 20, 20)):
    """A bright ellipsoid at a seed-dependent position on a noisy dark background."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    centre = rng.uniform(7, 13, size=3)
    inside = (((grid - centre[:, None, None, None]) / 5.0) ** 2).sum(0) < 1
    return (100 + 20 * rng.standard_normal(shape) + 300 * inside).astype(np.float32)


def _ids(folder):
    return sorted(f[:-len("_0000.nii.gz")] for f in os.listdir(folder))


@pytest.fixture
def env_root(planned_demo, tmp_path, monkeypatch):
    """A private copy of the shared planned demo (helpers.private_demo_copy), exported to this
    process, with one more imagesUnlabeled case whose id collides with an imagesTr case; returns
    the copy's root."""
    root = str(tmp_path / "env")
    env = private_demo_copy(planned_demo, root)
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_def_n_proc"):
        monkeypatch.setenv(var, env[var])
    global DATASET, TR_IDS, UNL_IDS
    DATASET = planned_demo.dataset_name
    TR_IDS, UNL_IDS = _ids(raw(root, "imagesTr")), _ids(raw(root, "imagesUnlabeled"))
    shutil.copy(raw(root, "imagesTr", TR_IDS[0] + "_0000.nii.gz"),
                raw(root, "imagesUnlabeled", TR_IDS[0] + "_0000.nii.gz"))
    return root


DATASET = TR_IDS = UNL_IDS = None  # set by env_root from the shared demo


def raw(root, *parts):
    return os.path.join(root, "raw", DATASET, *parts)


def all_ids():
    return sorted(TR_IDS + UNL_IDS + ["unl__" + TR_IDS[0]])


# ---------------------------------------------------------------------------------------------
# discovery

def test_discovery_sources_and_unique_ids(env_root, tmp_path):
    extra = tmp_path / "more"
    extra.mkdir()
    tr1 = TR_IDS[1]
    write_image(_blob(20), str(extra / f"{tr1}_0000.nii.gz"))
    write_image(_blob(21), str(extra / "other_0000.nii.gz"))
    cases = unlabeled.discover_pool(DATASET, unlabeled_dirs=[str(extra)])
    by_id = {c.case_id: c for c in cases}
    assert sorted(by_id) == sorted(all_ids() + ["dir0__" + tr1, "other"])
    assert {by_id[i].source for i in UNL_IDS} == {"imagesUnlabeled"}
    assert {by_id[i].source for i in TR_IDS} == {"imagesTr"}
    tr0 = TR_IDS[0]
    assert by_id["unl__" + tr0].files == (raw(env_root, "imagesUnlabeled", tr0 + "_0000.nii.gz"),)
    assert by_id[tr0].files == (raw(env_root, "imagesTr", tr0 + "_0000.nii.gz"),)
    assert by_id["dir0__" + tr1].source == f"unlabeled_dir:{extra}"
    assert by_id["dir0__" + tr1].files == (str(extra / f"{tr1}_0000.nii.gz"),)


def test_test_images_only_when_asked(env_root):
    shutil.rmtree(raw(env_root, "imagesTs"), ignore_errors=True)
    os.makedirs(raw(env_root, "imagesTs"))
    write_image(_blob(30), raw(env_root, "imagesTs", "t0_0000.nii.gz"))
    assert "t0" not in {c.case_id for c in unlabeled.discover_pool(DATASET)}
    cases = unlabeled.discover_pool(DATASET, include_test_images=True)
    assert {c.case_id: c.source for c in cases}["t0"] == "imagesTs"


@pytest.mark.parametrize("name, fragment", [
    ("bad_0001.nii.gz", "channel suffix _0001"),   # only one channel in dataset.json
    ("bad.nii.gz", "no channel suffix"),
    ("bad_0000.nii", "wrong file ending"),
])
def test_bad_names_are_errors_naming_the_file(env_root, name, fragment):
    path = raw(env_root, "imagesUnlabeled", name)
    shutil.copy(raw(env_root, "imagesTr", TR_IDS[1] + "_0000.nii.gz"), path)
    with pytest.raises(GeminiUserError) as e:
        unlabeled.discover_pool(DATASET)
    assert path in str(e.value) and fragment in str(e.value)
    assert "CASE_XXXX.nii.gz" in str(e.value)


def _make_two_channel_dataset(root):
    """dataset.json with two channels and no images of its own."""
    import json
    json_path = raw(root, "dataset.json")
    dataset_json = json.load(open(json_path))
    dataset_json["channel_names"] = {"0": "MR", "1": "PET"}
    json.dump(dataset_json, open(json_path, "w"))
    for sub in ("imagesTr", "imagesUnlabeled"):
        shutil.rmtree(raw(root, sub))


def test_missing_channel_is_error(env_root, tmp_path):
    d = tmp_path / "two_channels"
    d.mkdir()
    write_image(_blob(1), str(d / "x_0000.nii.gz"))
    write_image(_blob(1), str(d / "x_0001.nii.gz"))
    write_image(_blob(2), str(d / "y_0000.nii.gz"))
    _make_two_channel_dataset(env_root)
    with pytest.raises(GeminiUserError, match=r"case 'y' .* misses channel file\(s\) y_0001.nii.gz"):
        unlabeled.discover_pool(DATASET, unlabeled_dirs=[str(d)])


def test_empty_pool_is_error(env_root):
    for sub in ("imagesTr", "imagesUnlabeled"):
        shutil.rmtree(raw(env_root, sub))
    with pytest.raises(GeminiUserError, match="no unlabelled images"):
        unlabeled.discover_pool(DATASET)


# ---------------------------------------------------------------------------------------------
# preprocessing

def _pool_folder(root):
    return os.path.join(root, "preprocessed", DATASET, "nnUNetPlans_3d_fullres" +
                        unlabeled.POOL_SUFFIX)


def test_preprocess_writes_sibling_folder_and_is_incremental(env_root, capsys):
    data_folder = os.path.join(env_root, "preprocessed", DATASET, "nnUNetPlans_3d_fullres")
    before = sorted(os.listdir(data_folder))
    summary = unlabeled.preprocess_pool(DATASET)
    pool = _pool_folder(env_root)
    assert summary.folder == pool and summary.num_cases == len(all_ids()) and not summary.skipped
    assert sorted(os.listdir(data_folder)) == before  # nnU-Net's own folder untouched
    ids = unlabeled.pool_case_ids(pool)
    assert ids == all_ids()
    for c in ids:
        for f in (c + ".b2nd", c + "_seg.b2nd", c + ".pkl"):
            assert os.path.isfile(os.path.join(pool, f))
    with open(os.path.join(pool, UNL_IDS[0] + ".pkl"), "rb") as f:
        assert pickle.load(f)["class_locations"] == {}

    # the stored data equal what nnU-Net's own preprocessing produced for the same image
    ds = unlabeled.load_pool_dataset(pool, ids)
    tr1 = TR_IDS[1]
    ours, mask, _, _ = ds.load_case(tr1)
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    theirs, seg, _, _ = nnUNetDatasetBlosc2(data_folder, [tr1]).load_case(tr1)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=1e-5)
    # the "seg" of a pool case is the nonzero mask (0 inside, -1 outside), never the label
    assert set(np.unique(np.asarray(mask))) <= {-1, 0}
    assert set(np.unique(np.asarray(seg))) >= {1}

    mtimes = {f: os.stat(os.path.join(pool, f)).st_mtime_ns for f in os.listdir(pool)
              if f.endswith(".b2nd")}
    again = unlabeled.preprocess_pool(DATASET)
    assert again.processed == [] and again.num_cases == len(all_ids())
    assert mtimes == {f: os.stat(os.path.join(pool, f)).st_mtime_ns for f in mtimes}

    write_image(_blob(40), raw(env_root, "imagesUnlabeled", "late_0000.nii.gz"))
    third = unlabeled.preprocess_pool(DATASET)
    assert third.processed == ["late"] and third.num_cases == len(all_ids()) + 1
    assert mtimes == {f: os.stat(os.path.join(pool, f)).st_mtime_ns for f in mtimes}
    assert unlabeled.pool_case_ids(pool, exclude=[TR_IDS[0]]) == \
        sorted(set(all_ids() + ["late"]) - {TR_IDS[0]})


def test_moved_raw_folder_redoes_nothing_and_a_replaced_image_is_redone(env_root, monkeypatch):
    import json
    pool = unlabeled.preprocess_pool(DATASET).folder
    manifest_path = os.path.join(pool, unlabeled.MANIFEST_NAME)
    # nnUNet_raw moved (mv keeps sizes and mtimes): nothing is preprocessed again, the manifest follows
    moved = os.path.join(env_root, "raw_moved")
    shutil.move(os.path.join(env_root, "raw"), moved)
    monkeypatch.setenv("nnUNet_raw", moved)
    assert unlabeled.preprocess_pool(DATASET).processed == []
    files = [f for c in json.load(open(manifest_path))["cases"] for f in c["files"]]
    assert files and all(f.startswith(moved + os.sep) for f in files)

    # an image replaced in place (new content, later mtime): that case alone is redone
    case = UNL_IDS[0]
    before, _, _, _ = unlabeled.load_pool_dataset(pool, [case]).load_case(case)
    before = np.array(before)
    path = os.path.join(moved, DATASET, "imagesUnlabeled", case + "_0000.nii.gz")
    mtime = os.stat(path).st_mtime_ns
    write_image(_blob(77), path)
    os.utime(path, ns=(mtime + 10 ** 9, mtime + 10 ** 9))
    assert unlabeled.preprocess_pool(DATASET).processed == [case]
    after, _, _, _ = unlabeled.load_pool_dataset(pool, [case]).load_case(case)
    after = np.array(after)
    assert after.shape != before.shape or not np.allclose(before, after)  # the new image's data

    # a manifest written before the stamps existed: same files -> kept, stamps added
    manifest = json.load(open(manifest_path))
    for c in manifest["cases"]:
        del c["stamps"]
    json.dump(manifest, open(manifest_path, "w"))
    assert unlabeled.preprocess_pool(DATASET).processed == []
    assert all(len(c["stamps"]) == len(c["files"]) for c in json.load(open(manifest_path))["cases"])


def test_partial_case_not_in_manifest_is_redone(env_root):
    pool = unlabeled.preprocess_pool(DATASET).folder
    # simulate a crash after writing a case's data but before its manifest entry
    extra = UNL_IDS[0]
    import json
    manifest_path = os.path.join(pool, unlabeled.MANIFEST_NAME)
    manifest = json.load(open(manifest_path))
    manifest["cases"] = [c for c in manifest["cases"] if c["case_id"] != extra]
    json.dump(manifest, open(manifest_path, "w"))
    os.remove(os.path.join(pool, extra + ".pkl"))
    assert extra not in unlabeled.pool_case_ids(pool)
    assert unlabeled.preprocess_pool(DATASET).processed == [extra]
    assert extra in unlabeled.pool_case_ids(pool)


def _bad_inputs(root):
    nan_image = _blob(50)
    nan_image[3, 4, 5] = np.nan
    write_image(nan_image, raw(root, "imagesUnlabeled", "nanimg_0000.nii.gz"))
    good = open(raw(root, "imagesTr", TR_IDS[1] + "_0000.nii.gz"), "rb").read()
    with open(raw(root, "imagesUnlabeled", "trunc_0000.nii.gz"), "wb") as f:
        f.write(good[: len(good) // 2])


def _use_nibabel_reader(root):
    """ITK's NIfTI reader turns NaN into 0; nnU-Net's NibabelIO (a plans option) keeps them."""
    import json
    path = os.path.join(root, "preprocessed", DATASET, "nnUNetPlans.json")
    plans = json.load(open(path))
    plans["image_reader_writer"] = "NibabelIO"
    json.dump(plans, open(path, "w"))


def test_nan_and_truncated_images_are_warned_and_skipped(env_root, capsys):
    _bad_inputs(env_root)
    _use_nibabel_reader(env_root)
    summary = unlabeled.preprocess_pool(DATASET)
    assert sorted(summary.skipped) == ["nanimg", "trunc"]
    assert "NaN or Inf" in summary.skipped["nanimg"]
    assert "unreadable or truncated" in summary.skipped["trunc"]
    err = capsys.readouterr().err
    assert "WARNING:" in err and "nanimg_0000.nii.gz" in err and "trunc_0000.nii.gz" in err
    assert f"2 of {len(all_ids()) + 2} pool case(s) skipped" in err
    ids = unlabeled.pool_case_ids(summary.folder)
    assert "nanimg" not in ids and "trunc" not in ids and ids == all_ids()


def test_strict_turns_skips_into_errors(env_root):
    _bad_inputs(env_root)
    _use_nibabel_reader(env_root)
    with pytest.raises(GeminiUserError, match="nanimg_0000.nii.gz contains NaN or Inf"):
        unlabeled.preprocess_pool(DATASET, strict=True)
    os.remove(raw(env_root, "imagesUnlabeled", "nanimg_0000.nii.gz"))
    with pytest.raises(GeminiUserError, match="trunc_0000.nii.gz is unreadable or truncated"):
        unlabeled.preprocess_pool(DATASET, strict=True)


def test_truncated_file_detected_with_itk_reader(env_root):
    _bad_inputs(env_root)
    os.remove(raw(env_root, "imagesUnlabeled", "nanimg_0000.nii.gz"))
    summary = unlabeled.preprocess_pool(DATASET)
    assert list(summary.skipped) == ["trunc"] and summary.num_cases == len(all_ids())


def test_2d_image_in_3d_dataset_is_error(env_root):
    write_image(_blob(60)[10], raw(env_root, "imagesUnlabeled", "flat_0000.nii.gz"))
    with pytest.raises(GeminiUserError, match="flat_0000.nii.gz is a 2D image"):
        unlabeled.preprocess_pool(DATASET)


def test_channels_with_different_geometry_is_error(env_root, tmp_path):
    _make_two_channel_dataset(env_root)
    d = tmp_path / "mm"
    d.mkdir()
    write_image(_blob(1), str(d / "m_0000.nii.gz"))
    write_image(_blob(1), str(d / "m_0001.nii.gz"), spacing=(2.0, 1.0, 1.0))
    with pytest.raises(GeminiUserError, match="m_0001.nii.gz has shape .* spacing"):
        unlabeled.preprocess_pool(DATASET, unlabeled_dirs=[str(d)])


def test_worker_processes_give_the_same_pool(env_root):
    summary = unlabeled.preprocess_pool(DATASET, num_processes=2)
    assert sorted(summary.processed) == all_ids()
    assert unlabeled.pool_case_ids(summary.folder) == sorted(summary.processed)


def test_2d_configuration_pool(env_root):
    summary = unlabeled.preprocess_pool(DATASET, configuration="2d")
    assert summary.folder == os.path.join(env_root, "preprocessed", DATASET,
                                          "nnUNetPlans_2d" + unlabeled.POOL_SUFFIX)
    ds = unlabeled.load_pool_dataset(summary.folder, unlabeled.pool_case_ids(summary.folder))
    data, _, _, _ = ds.load_case(UNL_IDS[0])
    assert data.ndim == 4 and np.isfinite(np.asarray(data)).all()


def test_unknown_configuration_is_error(env_root):
    with pytest.raises(GeminiUserError, match="configuration '3d_lowres' not in plans"):
        unlabeled.preprocess_pool(DATASET, configuration="3d_lowres")


def test_pool_case_ids_without_pool_is_error(tmp_path):
    with pytest.raises(GeminiUserError, match="--preprocess_only"):
        unlabeled.pool_case_ids(str(tmp_path))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
