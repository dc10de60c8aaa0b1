"""Few-shot folds: disjoint, reproducible, right sizes, <5 labelled cases, overwrite refusal."""
import json
import os
import subprocess
import sys

import pytest
from helpers import private_demo_copy

from nnunet_gemini.errors import GeminiUserError
from nnunet_gemini.fewshot_split import fewshot_folds, write_fewshot_split

CASES = [f"case_{i:02d}" for i in range(10)]


def test_folds_sizes_disjoint_and_indexed():
    folds = fewshot_folds(CASES, [1, 2, 5], draws=3, seed=0, min_val=1)
    assert [(f["fold"], f["n"], f["draw"]) for f in folds] == [
        (i, n, d) for i, (n, d) in enumerate((n, d) for n in (1, 2, 5) for d in range(3))]
    for f in folds:
        assert len(f["train"]) == f["n"]
        assert not set(f["train"]) & set(f["val"])
        assert sorted(f["train"] + f["val"]) == CASES
    # draws of one N differ (10 choose 5 = 252 possibilities; seed 0 gives distinct ones)
    assert len({tuple(f["train"]) for f in folds if f["n"] == 5}) == 3


def test_reproducible_and_independent_of_other_ns():
    a = fewshot_folds(CASES, [2, 5], draws=2, seed=4)
    b = fewshot_folds(list(reversed(CASES)), [5], draws=3, seed=4)
    assert a == fewshot_folds(CASES, [2, 5], draws=2, seed=4)
    # the (5, draw) folds do not depend on which other N or how many draws were asked for
    assert [f["train"] for f in a if f["n"] == 5] == [f["train"] for f in b[:2]]
    assert [f["train"] for f in fewshot_folds(CASES, [5], 2, seed=5)] != [f["train"] for f in b[:2]]


def test_three_labelled_cases_and_validation_fallback():
    cases = ["a", "b", "c"]
    folds = fewshot_folds(cases, [1, 2, 3], draws=2, seed=1, min_val=1)
    for f in folds[:4]:
        assert len(f["train"]) == f["n"] and len(f["val"]) == 3 - f["n"]
    for f in folds[4:]:  # N uses every case: validate on the training cases, like fold `all`
        assert f["train"] == cases and f["val"] == cases
    with pytest.raises(GeminiUserError, match="--min_val 2"):
        fewshot_folds(cases, [2], draws=1, min_val=2)
    with pytest.raises(GeminiUserError, match="-n 4"):
        fewshot_folds(cases, [4], draws=1)


def _labelled_raw_dataset(root, name, n):
    raw = os.path.join(root["nnUNet_raw"], name)
    for sub in ("imagesTr", "labelsTr"):
        os.makedirs(os.path.join(raw, sub))
    for i in range(n):
        open(os.path.join(raw, "imagesTr", f"c{i}_0000.nii.gz"), "w").close()
        open(os.path.join(raw, "labelsTr", f"c{i}.nii.gz"), "w").close()
    open(os.path.join(raw, "imagesTr", "nolabel_0000.nii.gz"), "w").close()  # not labelled: ignored
    with open(os.path.join(raw, "dataset.json"), "w") as f:
        json.dump({"file_ending": ".nii.gz", "numTraining": n, "labels": {"background": 0, "x": 1},
                   "channel_names": {"0": "MR"}}, f)
    return raw


def test_write_requires_planned_and_refuses_overwrite(nnunet_env):
    name = "Dataset321_Three"
    _labelled_raw_dataset(nnunet_env, name, 3)
    with pytest.raises(GeminiUserError, match="not planned.*nnUNetv2_plan_and_preprocess -d 321"):
        write_fewshot_split(321, [1])
    folder = os.path.join(nnunet_env["nnUNet_preprocessed"], name)
    os.makedirs(folder)
    folds = write_fewshot_split("321", [1, 2], draws=2, seed=3)
    with open(os.path.join(folder, "splits_final.json")) as f:
        splits = json.load(f)
    with open(os.path.join(folder, "splits_fewshot.json")) as f:
        mapping = json.load(f)
    assert splits == [{"train": f["train"], "val": f["val"]} for f in folds]
    assert [(m["fold"], m["n"], m["draw"]) for m in mapping["folds"]] == [(0, 1, 0), (1, 1, 1), (2, 2, 0), (3, 2, 1)]
    assert all(set(s["train"]) | set(s["val"]) == {"c0", "c1", "c2"} for s in splits)
    with pytest.raises(GeminiUserError, match="splits_final.json exists.*--overwrite"):
        write_fewshot_split(321, [1])
    assert len(write_fewshot_split(321, [1], draws=1, overwrite=True)) == 1


def test_cli_on_planned_demo(planned_demo, tmp_path):
    """The real command on the planned tiny demo (a copy: the session fixture stays read-only)."""
    env = private_demo_copy(planned_demo, tmp_path / "demo")
    cmd = [sys.executable, "-m", "nnunet_gemini.fewshot_split", "-d", str(planned_demo.dataset_id),
           "-n", "1", "3", "--draws", "2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "fold  N  draw" in proc.stdout and "splits_final.json" in proc.stdout
    splits_path = os.path.join(env["nnUNet_preprocessed"], planned_demo.dataset_name, "splits_final.json")
    with open(splits_path) as f:
        splits = json.load(f)
    assert [len(s["train"]) for s in splits] == [1, 1, 3, 3] and [len(s["val"]) for s in splits] == [3, 3, 1, 1]
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "--overwrite" in again.stderr
