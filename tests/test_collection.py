"""gemini_benchmark --collection on a tiny generated labelled collection: the split is disjoint and
reproducible from its seed, each (N, draw) dataset holds exactly its N labelled cases and is planned
from them, results carry the commit, a second call skips finished runs, another seed on the same -o
is refused, and every bad input is refused before anything trains."""
import glob
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import nnunet_env_dict, run_command

SHAPES = [(20, 24, 22), (22, 24, 24), (20, 26, 24), (21, 24, 23), (20, 24, 24), (22, 25, 22), (20, 24, 25)]


def _write(array, path, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)):
    import SimpleITK as sitk
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    sitk.WriteImage(image, path)


def make_collection(root, shapes=SHAPES, seed=0):
    """images/ + labels/: a bright ellipsoid (label 1) with a core (label 2) in noise, one shape per case."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "images"))
    os.makedirs(os.path.join(root, "labels"))
    for i, shape in enumerate(shapes):
        z, y, x = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
        r = np.sqrt((z / 0.6) ** 2 + (y / 0.5) ** 2 + (x / 0.55) ** 2) * rng.uniform(0.9, 1.1)
        label = (r < 1).astype(np.uint8) + (r < 0.5).astype(np.uint8)
        image = (100 * label + rng.normal(0, 10, shape)).astype(np.float32)
        _write(image, os.path.join(root, "images", f"case_{i:03d}.nii.gz"))
        _write(label, os.path.join(root, "labels", f"case_{i:03d}.nii.gz"))
    return str(root)


# ---------------------------------------------------------------------- the split
def test_split_is_disjoint_reproducible_and_stable_when_draws_are_added():
    from nnunet_gemini.collection import draw_split
    ids = [f"c{i:02d}" for i in range(20)]
    a = draw_split(ids, 5, 6, 3, [1, 2], 2, seed=3)
    assert a == draw_split(list(reversed(ids)), 5, 6, 3, [1, 2], 2, seed=3)  # from the sorted ids
    assert a != draw_split(ids, 5, 6, 3, [1, 2], 2, seed=4)
    assert (len(a["test"]), len(a["pool"]), len(a["selection"]), len(a["labelled_candidates"])) == (5, 6, 3, 6)
    parts = [set(a[k]) for k in ("test", "pool", "selection", "labelled_candidates")]
    assert set.union(*parts) == set(ids) and sum(map(len, parts)) == len(ids)
    for d in a["draws"]:
        assert len(d["train"]) == d["n"] and set(d["train"]) <= parts[3]
    assert [(d["n"], d["draw"]) for d in a["draws"]] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    more = draw_split(ids, 5, 6, 3, [1, 2, 5], 3, seed=3)  # more N and draws leave the others as they were
    assert [d for d in more["draws"] if (d["n"], d["draw"]) in {(1, 0), (1, 1), (2, 0), (2, 1)}] == a["draws"]


def test_too_few_cases_is_refused_naming_the_numbers():
    from nnunet_gemini.collection import draw_split
    from nnunet_gemini.errors import GeminiUserError
    with pytest.raises(GeminiUserError, match=r"holds 10 labelled cases, fewer than --test_cases 5 \+ --pool_cases 4 "
                                              r"\+ --selection_cases 1 \+ the largest --n 2 = 12"):
        draw_split([f"c{i}" for i in range(10)], 5, 4, 1, [1, 2], 1, seed=0)


# ---------------------------------------------------------------------- bad input
def _bad(tmp_path, what):
    root = make_collection(tmp_path / "coll")
    images, labels = os.path.join(root, "images"), os.path.join(root, "labels")
    if what == "image without label":
        os.remove(os.path.join(labels, "case_001.nii.gz"))
        return root, r"images/case_001.nii.gz has no label .*labels/case_001.nii.gz: add it or move the image out"
    if what == "label without image":
        os.rename(os.path.join(images, "case_001.nii.gz"), os.path.join(tmp_path, "moved.nii.gz"))
        return root, r"labels/case_001.nii.gz has no image .*: add it or move the label out"
    if what == "mixed file endings":
        os.rename(os.path.join(images, "case_002.nii.gz"), os.path.join(images, "case_002.nrrd"))
        return root, r"all images need one file ending"
    if what == "geometry mismatch":
        _write(np.zeros(SHAPES[1], np.uint8), os.path.join(labels, "case_001.nii.gz"), spacing=(2.0, 1.0, 1.0))
        return root, r"images/case_001.nii.gz and its label .*case_001.nii.gz differ in geometry.*resample the label"
    if what == "unreadable file":
        with open(os.path.join(images, "case_002.nii.gz"), "wb") as f:
            f.write(b"not an image")
        return root, r"images/case_002.nii.gz is unreadable .*replace or remove the file"
    if what == "label value outside dataset.json":
        with open(os.path.join(root, "dataset.json"), "w") as f:
            json.dump({"channel_names": {"0": "MRI"}, "labels": {"background": 0, "outer": 1},
                       "file_ending": ".nii.gz"}, f)
        return root, r"labels/case_000.nii.gz holds label value\(s\) \[2\] that .*dataset.json does not define"
    if what == "non-integer labels":
        _write(np.full(SHAPES[0], 0.5, np.float32), os.path.join(labels, "case_000.nii.gz"))
        return root, r"labels/case_000.nii.gz holds label values \[0.5\], not non-negative integers"
    raise AssertionError(what)


BAD = ["image without label", "label without image", "mixed file endings", "geometry mismatch", "unreadable file",
       "label value outside dataset.json", "non-integer labels"]


@pytest.mark.parametrize("what", BAD)
def test_bad_collection_is_refused_naming_the_file_and_the_fix(what, tmp_path):
    from nnunet_gemini.collection import check_collection, read_collection
    from nnunet_gemini.errors import GeminiUserError
    root, message = _bad(tmp_path, what)
    with pytest.raises(GeminiUserError, match=message):
        check_collection(read_collection(root))


def test_bad_collection_stops_the_cli_before_any_dataset_is_built(tmp_path):
    root, _ = _bad(tmp_path, "geometry mismatch")
    env = nnunet_env_dict(tmp_path / "nn")
    out = tmp_path / "study"
    proc = __import__("subprocess").run(
        [sys.executable, "-m", "nnunet_gemini.benchmark", "--collection", root, "--test_cases", "1", "--pool_cases",
         "2", "--selection_cases", "1", "--n", "1", "--draws", "1", "-device", "cpu", "-o", str(out)],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.startswith("ERROR: ") and "differ in geometry" in proc.stderr
    assert not (out / "nnUNet_raw").exists() or not os.listdir(out / "nnUNet_raw")


def test_nnunet_raw_dataset_form_draws_only_labelled_training_cases(tmp_path):
    from nnunet_gemini.collection import NNUNET_FORM, check_collection, read_collection
    root = tmp_path / "Dataset123_Raw"
    make_collection(tmp_path / "src", SHAPES[:4])
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        os.makedirs(root / sub)
    for i in range(4):
        os.rename(tmp_path / "src" / "images" / f"case_{i:03d}.nii.gz", root / "imagesTr" / f"case_{i:03d}_0000.nii.gz")
        os.rename(tmp_path / "src" / "labels" / f"case_{i:03d}.nii.gz", root / "labelsTr" / f"case_{i:03d}.nii.gz")
    os.rename(root / "imagesTr" / "case_003_0000.nii.gz", root / "imagesTs" / "case_003_0000.nii.gz")
    json.dump({"channel_names": {"0": "T1"}, "labels": {"background": 0, "a": 1, "b": 2}, "file_ending": ".nii.gz",
               "numTraining": 3}, open(root / "dataset.json", "w"))
    coll = read_collection(str(root))
    assert (coll.form, coll.case_ids, coll.channel_names) == (NNUNET_FORM, ["case_000", "case_001", "case_002"],
                                                              {"0": "T1"})
    assert check_collection(coll) == {"background": 0, "a": 1, "b": 2}


# ---------------------------------------------------------------------- the study, end to end
@pytest.fixture(scope="module")
def collection_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("collection_study")
    coll = make_collection(root / "coll")
    env = nnunet_env_dict(root / "user_nnunet")  # the user's folders: a collection study must not touch them
    out = root / "study"
    cmd = [sys.executable, "-m", "nnunet_gemini.benchmark", "--collection", coll, "--test_cases", "2",
           "--pool_cases", "2", "--selection_cases", "1", "--split_seed", "5", "--n", "1", "2", "--draws", "1",
           "--methods", "nnUNetTrainer", "--registration", "none", "--train_epochs", "1", "--train_iters", "1",
           "--val_iters", "1", "-device", "cpu", "-o", str(out)]
    first = run_command(cmd, env, timeout=900)
    return dict(cmd=cmd, env=env, out=out, coll=coll, first=first)


def test_each_dataset_holds_its_n_cases_and_is_planned_from_them(collection_study):
    from nnunet_gemini.collection import draw_split, read_collection
    out = collection_study["out"]
    results = json.loads((out / "results.json").read_text())
    split = draw_split(read_collection(collection_study["coll"]).case_ids, 2, 2, 1, [1, 2], 1, seed=5)
    assert {k: results["collection"][k] for k in ("test", "pool", "selection")} == \
        {k: split[k] for k in ("test", "pool", "selection")}
    assert len(results["collection"]["files"]) == 2 * len(SHAPES)
    assert all(len(f["sha256"]) == 64 for f in results["collection"]["files"])
    for d in split["draws"]:
        record = results["datasets"][f"N{d['n']}_draw{d['draw']}"]
        assert record["train"] == d["train"]
        raw = out / "nnUNet_raw" / record["name"]
        assert sorted(os.listdir(raw / "imagesTr")) == [f"{c}_0000.nii.gz" for c in d["train"]]
        assert sorted(os.listdir(raw / "labelsTr")) == [f"{c}.nii.gz" for c in d["train"]]
        assert sorted(os.listdir(raw / "imagesUnlabeled")) == [f"{c}_0000.nii.gz" for c in split["pool"]]
        assert sorted(os.listdir(raw / "labelsTs")) == [f"{c}.nii.gz" for c in split["test"]]
        assert sorted(os.listdir(raw / "labelsSelection")) == [f"{c}.nii.gz" for c in split["selection"]]
        fingerprint = json.load(open(out / "nnUNet_preprocessed" / record["name"] / "dataset_fingerprint.json"))
        assert len(fingerprint["shapes_after_crop"]) == d["n"]  # planned from its N cases only
        assert json.load(open(raw / "dataset.json"))["labels"] == {"background": 0, "label_1": 1, "label_2": 2}
        assert record["plans_signature"] in results["pretraining_groups"]
    assert not os.listdir(collection_study["env"]["nnUNet_raw"])  # the user's nnUNet_raw stays untouched
    runs = results["runs"]
    assert sorted((r["n"], r["fold"]) for r in runs) == [(1, "all"), (2, "all")]
    from nnunet_gemini.workflow import project_revision
    for r in runs:
        assert r["revision"] == project_revision() and r["revision"]
        assert len(r["dice_per_case"]) == 2 and len(r["selection"]["dice_per_case"]) == 1
        assert 0 <= r["dice_mean"] <= 1
    table = (out / "results.md").read_text()
    assert "selection set (1 cases" in table and "| nnUNetTrainer | " in table


def test_second_call_skips_and_another_seed_is_refused(collection_study):
    out, env, cmd = collection_study["out"], collection_study["env"], collection_study["cmd"]
    before = json.loads((out / "results.json").read_text())["runs"]
    second = run_command(cmd, env, timeout=600)
    assert second.stdout.count("done already") == 2 and "nnUNetv2_train" not in second.stdout
    assert "plan_and_preprocess" not in second.stdout  # built and planned datasets are kept
    assert json.loads((out / "results.json").read_text())["runs"] == before
    seed = cmd.index("--split_seed") + 1
    import subprocess
    for changed in (cmd[:seed] + ["6"] + cmd[seed + 1:],
                    [c if c != "--pool_cases" else "--selection_cases" for c in cmd]):
        proc = subprocess.run(changed, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and "belongs to another study" in proc.stderr, proc.stderr


def test_pretraining_ablation_runs_its_own_pretraining_and_rows(collection_study):
    """--pretrain_decorrelation W end to end: a gemini_pretrain --decorrelation W run of its own (the
    standard pre-training place stays empty), Finetune trained from it, its row and record labelled;
    run for N = 2 alone after the dataset its group pre-trains on (N = 1's) was lost."""
    out, env, cmd = collection_study["out"], collection_study["env"], collection_study["cmd"]
    methods = cmd.index("--methods") + 1
    call = cmd[:methods] + ["nnUNetTrainerGEMINIFinetune"] + cmd[methods + 1:]
    call[call.index("--n") + 1:call.index("--n") + 3] = ["2"]
    # N = 2 shares N = 1's pre-training; with N = 1's folders lost (a scratch folder is not
    # kept between sessions) a call for N = 2 alone rebuilds N = 1's dataset to pre-train on it
    first = json.loads((out / "results.json").read_text())
    n1, n2 = first["datasets"]["N1_draw0"], first["datasets"]["N2_draw0"]
    assert first["pretraining_groups"][n2["plans_signature"]] == n1["name"]
    for folder in ("nnUNet_raw", "nnUNet_preprocessed"):
        shutil.rmtree(out / folder / n1["name"])
    run_command(call + ["--pretrain_decorrelation", "1", "--pretrain_epochs", "1", "--pretrain_iters", "1"], env,
                timeout=900)
    results = json.loads((out / "results.json").read_text())
    (key,) = results["pretraining"]
    assert key.endswith(" (pre-training decorrelation 1)")
    assert results["pretraining"][key]["pretrain_decorrelation"] == 1
    checkpoint = Path(results["pretraining"][key]["checkpoint"])
    assert checkpoint.is_file() and checkpoint.parent.parent == out
    log = open(glob.glob(str(checkpoint.parent / "training_log_*.txt"))[0]).read()
    assert "decorrelation weight 1, on the encoder 0;" in log
    assert not glob.glob(str(out / "nnUNet_results" / "*" / "GEMINIPretrain__*" / "fold_all" / "checkpoint_final.pth"))
    assert results["pretraining"][key]["dataset"] == n1["name"] and (out / "nnUNet_raw" / n1["name"]).is_dir()
    (run,) = [r for r in results["runs"] if r["method"] == "nnUNetTrainerGEMINIFinetune"]
    assert run["n"] == 2 and run["pretraining"] == key
    assert run["label"] == "nnUNetTrainerGEMINIFinetune (pre-training decorrelation 1)"
    assert "| nnUNetTrainerGEMINIFinetune (pre-training decorrelation 1) | " in (out / "results.md").read_text()


def test_a_lost_pretraining_reruns_only_for_runs_that_load_it(collection_study):
    """A pre-training whose checkpoint is gone (a lost scratch folder) is not rerun when every run of
    the call that loads it is done; it is rerun for one that is not, as a new attempt: the record and
    the registration record of the deformer it replaced stay in pretraining_replaced, and the runs
    that loaded it keep their record."""
    out, env, cmd = collection_study["out"], collection_study["env"], collection_study["cmd"]
    methods = cmd.index("--methods") + 1
    call = cmd[:methods] + ["nnUNetTrainerGEMINIFinetune"] + cmd[methods + 1:] + [
        "--pretrain_decorrelation", "1", "--pretrain_epochs", "1", "--pretrain_iters", "1"]
    before = json.loads((out / "results.json").read_text())
    (key,) = before["pretraining"]  # the ablation test's, which trained N = 2 from it
    checkpoint = Path(before["pretraining"][key]["checkpoint"])
    checkpoint.unlink()
    checkpoint.with_name("checkpoint_latest.pth").unlink()  # lost with it (one left there is resumed)
    n2_only = list(call)
    n2_only[n2_only.index("--n") + 1:n2_only.index("--n") + 3] = ["2"]
    second = run_command(n2_only, env, timeout=600)
    assert "done already" in second.stdout and "gemini_pretrain" not in second.stdout
    assert json.loads((out / "results.json").read_text())["pretraining"] == before["pretraining"]
    assert not checkpoint.exists()
    # N = 1 has not run from it: the pre-training runs again, and a registration record of the old deformer goes
    results = json.loads((out / "results.json").read_text())
    old_registration = {"deformation": "diffeomorphic", "pretrain_iterations": 1, "pairs": 2, "dice_mean": 0.5,
                        "dice_std": 0.1}
    results["registration"][key] = old_registration
    (out / "results.json").write_text(json.dumps(results))
    third = run_command(call, env, timeout=900)
    assert "gemini_pretrain" in third.stdout and checkpoint.is_file()
    results = json.loads((out / "results.json").read_text())
    assert key not in results["registration"]
    (replaced,) = results["pretraining_replaced"]
    assert replaced == dict(before["pretraining"][key], key=key, replaced=replaced["replaced"],
                            registration=old_registration)
    assert f"| {key} (attempt 0, replaced) (1 pre-train it) | 2 | 0.500 ± 0.100 |" in (out / "results.md").read_text()
    assert results["pretraining"][key]["attempt"] == 1
    runs = {r["n"]: r for r in results["runs"] if r["method"] == "nnUNetTrainerGEMINIFinetune"}
    earlier = next(r for r in before["runs"] if r["label"] == runs[2]["label"])
    shared = ("pretrain_share_seconds", "wall_seconds")
    assert set(runs) == {1, 2} and {k: v for k, v in runs[2].items() if k not in shared} == \
        {k: v for k, v in earlier.items() if k not in shared} and runs[2]["pretraining_attempt"] == 0
    assert runs[1]["pretraining_attempt"] == 1  # each carries its own attempt's seconds over both
    assert runs[2]["pretrain_share_seconds"] == round(before["pretraining"][key]["seconds"] / 2, 1)
    assert runs[1]["pretrain_share_seconds"] == round(results["pretraining"][key]["seconds"] / 2, 1)
    stage = checkpoint.parent.name
    assert (out / "logs" / f"{stage}.log").is_file() and (out / "logs" / f"{stage}_attempt1.log").is_file()
    assert (checkpoint.parent / "progress_attempt1.png").is_file()


def test_deformation_ablation_trains_from_a_displacement_pretraining(collection_study):
    """--gemini_deformation displacement end to end: gemini_pretrain --deformation displacement in a
    folder of its own, and nnUNetTrainerGEMINI fine-tuned from it with a displacement deformer (its
    checkpoint says so), in a row of its own."""
    import torch
    out, env, cmd = collection_study["out"], collection_study["env"], collection_study["cmd"]
    methods = cmd.index("--methods") + 1
    call = cmd[:methods] + ["nnUNetTrainerGEMINI"] + cmd[methods + 1:]
    call[call.index("--n") + 1:call.index("--n") + 3] = ["1"]
    run_command(call + ["--gemini_deformation", "displacement", "--pretrain_epochs", "1", "--pretrain_iters", "1"],
                env, timeout=900)
    results = json.loads((out / "results.json").read_text())
    (run,) = [r for r in results["runs"] if r.get("gemini_deformation") == "displacement"]
    assert run["label"] == "nnUNetTrainerGEMINI (deformation displacement)"
    record = results["pretraining"][run["pretraining"]]
    assert run["pretraining"].startswith("displacement:") and record["deformation"] == "displacement"
    assert Path(record["checkpoint"]).parent == out / f"pretrain_displacement_{record['dataset']}"
    folder = out / "nnUNet_results_ablation_deformationdisplacement" / run["dataset"] / \
        "nnUNetTrainerGEMINI__nnUNetPlans__3d_fullres" / "fold_all"
    trained = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert trained["gemini"]["deformation"] == "displacement" and trained["gemini"]["deformer"]["bidirectional"]
    assert str(Path(record["checkpoint"]).name) in trained["gemini"]["pretrained_source"]
    assert "| nnUNetTrainerGEMINI (deformation displacement) | " in (out / "results.md").read_text()
