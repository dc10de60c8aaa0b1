"""Unlabelled pool: discovery, validation (ERROR / WARN), preprocessing into the sibling folder,
incremental re-runs, loading with nnU-Net's dataset class."""
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_gemini.errors import GeminiUserError
from nnunet_gemini import unlabeled

DATASET_ID = 951
DATASET = "Dataset951_GeminiPoolTest"
SHAPE = (20, 20, 20)


def _blob(seed: int, shape=SHAPE):
    """A bright ellipsoid at a case-specific position on a noisy dark background, + its label."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    centre = rng.uniform(7, 13, size=3)
    inside = (((grid - centre[:, None, None, None]) / 5.0) ** 2).sum(0) < 1
    image = 100 + 20 * rng.standard_normal(shape) + 300 * inside
    return image.astype(np.float32), inside.astype(np.uint8)


def write_image(array, path, spacing=(1.0, 1.0, 1.0)):
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing[:array.ndim])
    sitk.WriteImage(img, path)


def make_raw_dataset(raw_root: str) -> str:
    folder = os.path.join(raw_root, DATASET)
    for sub in ("imagesTr", "labelsTr", "imagesUnlabeled"):
        os.makedirs(os.path.join(folder, sub))
    for i in range(3):
        image, label = _blob(i)
        write_image(image, os.path.join(folder, "imagesTr", f"case{i}_0000.nii.gz"))
        write_image(label, os.path.join(folder, "labelsTr", f"case{i}.nii.gz"))
    # one id only in imagesUnlabeled, one that collides with an imagesTr id
    write_image(_blob(10)[0], os.path.join(folder, "imagesUnlabeled", "extra_0000.nii.gz"))
    write_image(_blob(11)[0], os.path.join(folder, "imagesUnlabeled", "case0_0000.nii.gz"))
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        f.write('{"channel_names": {"0": "CT"}, "labels": {"background": 0, "blob": 1}, '
                '"numTraining": 3, "file_ending": ".nii.gz"}')
    return folder


def _set_env(monkeypatch, root):
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.makedirs(os.path.join(root, var), exist_ok=True)
        monkeypatch.setenv(var, os.path.join(root, var))
    monkeypatch.setenv("nnUNet_def_n_proc", "1")


@pytest.fixture(scope="module")
def planned_root(tmp_path_factory):
    """nnUNet_raw/preprocessed/results with the tiny dataset planned for 3d_fullres (once)."""
    root = str(tmp_path_factory.mktemp("pool_env"))
    env = dict(os.environ)
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.makedirs(os.path.join(root, var))
        env[var] = os.path.join(root, var)
    env["nnUNet_def_n_proc"] = "1"
    env.pop("nnUNet_n_proc_DA", None)  # 2.8.1's planning crashes with it set to 0
    make_raw_dataset(env["nnUNet_raw"])
    subprocess.run(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "3d_fullres",
                    "-np", "1", "-npfp", "1"], env=env, check=True, capture_output=True)
    return root


@pytest.fixture
def env_root(planned_root, tmp_path, monkeypatch):
    """A private copy of the planned folders, so tests may add files."""
    root = str(tmp_path / "env")
    shutil.copytree(planned_root, root)
    _set_env(monkeypatch, root)
    return root


def raw(root, *parts):
    return os.path.join(root, "nnUNet_raw", DATASET, *parts)


# ---------------------------------------------------------------------------------------------
# discovery

def test_discovery_sources_and_unique_ids(env_root, tmp_path):
    extra = tmp_path / "more"
    extra.mkdir()
    write_image(_blob(20)[0], str(extra / "case1_0000.nii.gz"))
    write_image(_blob(21)[0], str(extra / "other_0000.nii.gz"))
    cases = unlabeled.discover_pool(DATASET, unlabeled_dirs=[str(extra)])
    by_id = {c.case_id: c for c in cases}
    assert sorted(by_id) == ["case0", "case1", "case2", "dir0__case1", "extra", "other",
                             "unl__case0"]
    assert by_id["extra"].source == "imagesUnlabeled"
    assert by_id["unl__case0"].files == (raw(env_root, "imagesUnlabeled", "case0_0000.nii.gz"),)
    assert by_id["case0"].source == "imagesTr"
    assert by_id["dir0__case1"].source == f"unlabeled_dir:{extra}"
    assert by_id["dir0__case1"].files == (str(extra / "case1_0000.nii.gz"),)


def test_test_images_only_when_asked(env_root):
    os.makedirs(raw(env_root, "imagesTs"))
    write_image(_blob(30)[0], raw(env_root, "imagesTs", "t0_0000.nii.gz"))
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
    shutil.copy(raw(env_root, "imagesUnlabeled", "extra_0000.nii.gz"), path)
    with pytest.raises(GeminiUserError) as e:
        unlabeled.discover_pool(DATASET)
    assert path in str(e.value) and fragment in str(e.value)
    assert "CASE_XXXX.nii.gz" in str(e.value)


def test_missing_channel_is_error(env_root, tmp_path):
    d = tmp_path / "two_channels"
    d.mkdir()
    write_image(_blob(1)[0], str(d / "x_0000.nii.gz"))
    write_image(_blob(1)[0], str(d / "x_0001.nii.gz"))
    write_image(_blob(2)[0], str(d / "y_0000.nii.gz"))
    json_path = raw(env_root, "dataset.json")
    text = open(json_path).read().replace('{"0": "CT"}', '{"0": "CT", "1": "PET"}')
    for sub in ("imagesTr", "imagesUnlabeled"):
        shutil.rmtree(raw(env_root, sub))
    open(json_path, "w").write(text)
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
    return os.path.join(root, "nnUNet_preprocessed", DATASET, "nnUNetPlans_3d_fullres" +
                        unlabeled.POOL_SUFFIX)


def test_preprocess_writes_sibling_folder_and_is_incremental(env_root, capsys):
    data_folder = os.path.join(env_root, "nnUNet_preprocessed", DATASET, "nnUNetPlans_3d_fullres")
    before = sorted(os.listdir(data_folder))
    summary = unlabeled.preprocess_pool(DATASET)
    pool = _pool_folder(env_root)
    assert summary.folder == pool and summary.num_cases == 5 and not summary.skipped
    assert sorted(os.listdir(data_folder)) == before  # nnU-Net's own folder untouched
    ids = unlabeled.pool_case_ids(pool)
    assert ids == ["case0", "case1", "case2", "extra", "unl__case0"]
    for c in ids:
        for f in (c + ".b2nd", c + "_seg.b2nd", c + ".pkl"):
            assert os.path.isfile(os.path.join(pool, f))
    with open(os.path.join(pool, "extra.pkl"), "rb") as f:
        assert pickle.load(f)["class_locations"] == {}

    # the stored data equal what nnU-Net's own preprocessing produced for the same image
    ds = unlabeled.load_pool_dataset(pool, ids)
    ours, mask, _, _ = ds.load_case("case1")
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    theirs, seg, _, _ = nnUNetDatasetBlosc2(data_folder, ["case1"]).load_case("case1")
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=1e-5)
    # the "seg" of a pool case is the nonzero mask (0 inside, -1 outside), never the label
    assert set(np.unique(np.asarray(mask))) <= {-1, 0}
    assert set(np.unique(np.asarray(seg))) >= {1}

    mtimes = {f: os.stat(os.path.join(pool, f)).st_mtime_ns for f in os.listdir(pool)
              if f.endswith(".b2nd")}
    again = unlabeled.preprocess_pool(DATASET)
    assert again.processed == [] and again.num_cases == 5
    assert mtimes == {f: os.stat(os.path.join(pool, f)).st_mtime_ns for f in mtimes}

    write_image(_blob(40)[0], raw(env_root, "imagesUnlabeled", "late_0000.nii.gz"))
    third = unlabeled.preprocess_pool(DATASET)
    assert third.processed == ["late"] and third.num_cases == 6
    assert mtimes == {f: os.stat(os.path.join(pool, f)).st_mtime_ns for f in mtimes}
    assert unlabeled.pool_case_ids(pool, exclude=["case0"]) == \
        ["case1", "case2", "extra", "late", "unl__case0"]


def test_partial_case_not_in_manifest_is_redone(env_root):
    pool = unlabeled.preprocess_pool(DATASET).folder
    # simulate a crash after writing extra's data but before its manifest entry
    import json
    manifest_path = os.path.join(pool, unlabeled.MANIFEST_NAME)
    manifest = json.load(open(manifest_path))
    manifest["cases"] = [c for c in manifest["cases"] if c["case_id"] != "extra"]
    json.dump(manifest, open(manifest_path, "w"))
    os.remove(os.path.join(pool, "extra.pkl"))
    assert "extra" not in unlabeled.pool_case_ids(pool)
    assert unlabeled.preprocess_pool(DATASET).processed == ["extra"]
    assert "extra" in unlabeled.pool_case_ids(pool)


def _bad_inputs(root):
    nan_image = _blob(50)[0]
    nan_image[3, 4, 5] = np.nan
    write_image(nan_image, raw(root, "imagesUnlabeled", "nanimg_0000.nii.gz"))
    good = open(raw(root, "imagesUnlabeled", "extra_0000.nii.gz"), "rb").read()
    with open(raw(root, "imagesUnlabeled", "trunc_0000.nii.gz"), "wb") as f:
        f.write(good[: len(good) // 2])


def test_nan_and_truncated_images_are_warned_and_skipped(env_root, capsys):
    _bad_inputs(env_root)
    summary = unlabeled.preprocess_pool(DATASET)
    assert sorted(summary.skipped) == ["nanimg", "trunc"]
    assert "NaN or Inf" in summary.skipped["nanimg"]
    assert "unreadable or truncated" in summary.skipped["trunc"]
    err = capsys.readouterr().err
    assert "WARNING:" in err and "nanimg_0000.nii.gz" in err and "trunc_0000.nii.gz" in err
    assert "2 of 7 pool case(s) skipped" in err
    ids = unlabeled.pool_case_ids(summary.folder)
    assert "nanimg" not in ids and "trunc" not in ids and len(ids) == 5


def test_strict_turns_skips_into_errors(env_root):
    _bad_inputs(env_root)
    with pytest.raises(GeminiUserError, match="(nanimg|trunc)_0000.nii.gz"):
        unlabeled.preprocess_pool(DATASET, strict=True)


def test_2d_image_in_3d_dataset_is_error(env_root):
    write_image(_blob(60)[0][10], raw(env_root, "imagesUnlabeled", "flat_0000.nii.gz"))
    with pytest.raises(GeminiUserError, match="flat_0000.nii.gz is a 2D image"):
        unlabeled.preprocess_pool(DATASET)


def test_channels_with_different_geometry_is_error(env_root, tmp_path):
    json_path = raw(env_root, "dataset.json")
    open(json_path, "w").write(open(json_path).read().replace('{"0": "CT"}',
                                                              '{"0": "CT", "1": "PET"}'))
    for sub in ("imagesTr", "imagesUnlabeled"):
        shutil.rmtree(raw(env_root, sub))
    d = tmp_path / "mm"
    d.mkdir()
    write_image(_blob(1)[0], str(d / "m_0000.nii.gz"))
    write_image(_blob(1)[0], str(d / "m_0001.nii.gz"), spacing=(2.0, 1.0, 1.0))
    with pytest.raises(GeminiUserError, match="m_0001.nii.gz has shape .* spacing"):
        unlabeled.preprocess_pool(DATASET, unlabeled_dirs=[str(d)])


def test_worker_processes_give_the_same_pool(env_root):
    summary = unlabeled.preprocess_pool(DATASET, num_processes=2)
    assert sorted(summary.processed) == ["case0", "case1", "case2", "extra", "unl__case0"]
    assert unlabeled.pool_case_ids(summary.folder) == sorted(summary.processed)


def test_pool_case_ids_without_pool_is_error(tmp_path):
    with pytest.raises(GeminiUserError, match="--preprocess_only"):
        unlabeled.pool_case_ids(str(tmp_path))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
