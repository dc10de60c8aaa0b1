"""gemini_doctor: reports versions, variables, dataset counts; non-zero exit with a fix."""
import subprocess
import sys

from nnunet_gemini.doctor import dataset_findings, environment_findings


def _doctor(env, *args):
    return subprocess.run([sys.executable, "-m", "nnunet_gemini.doctor", *args], env=env,
                          capture_output=True, text=True, timeout=300)


def test_doctor_on_planned_demo_prints_counts(planned_demo):
    proc = _doctor(planned_demo.env, "-d", str(planned_demo.dataset_id))
    out = proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    for text in ("python", "torch", "nnunetv2", "nnunet_gemini", "accelerator",
                 "trainer nnUNetTrainerGEMINI", planned_demo.dataset_name):
        assert text in out, text
    lines = {line.split()[1]: line for line in out.splitlines() if line[:3] in ("ok ", "BAD")}
    assert lines["labelled"].startswith("ok") and " 4 (imagesTr" in lines["labelled"]
    assert " 4 (imagesUnlabeled/)" in lines["unlabelled"]
    assert lines["planned"].startswith("ok") and "2d" in lines["planned"] and "3d_fullres" in lines["planned"]
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        assert lines[var].startswith("ok") and "(exists)" in lines[var]
    # 4 labelled cases < 5: tells how to train
    assert "fold all" in out and f"gemini_fewshot_split -d {planned_demo.dataset_id} -n N" in out
    problems = [line for line in out.splitlines() if line.startswith("BAD")]
    assert (proc.returncode == 0) == (not problems), out


def test_doctor_missing_raw_names_variable_and_fails(planned_demo):
    env = dict(planned_demo.env)
    env.pop("nnUNet_raw")
    proc = _doctor(env)
    assert proc.returncode == 1
    assert "BAD nnUNet_raw" in proc.stdout
    assert "FIX nnUNet_raw: export nnUNet_raw=" in proc.stdout


def test_findings_in_process(nnunet_env, monkeypatch, tmp_path):
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "nowhere"))
    by_topic = {f.topic: f for f in environment_findings()}
    assert by_topic["nnUNet_raw"].ok and not by_topic["nnUNet_results"].ok
    assert by_topic["nnUNet_results"].fix == f"mkdir -p {tmp_path / 'nowhere'}"
    (missing,) = dataset_findings("55", "nnUNetPlans")
    assert not missing.ok and "055" in missing.detail


def test_doctor_unplanned_dataset(nnunet_env):
    from nnunet_gemini.demo_data import make_demo_dataset
    make_demo_dataset(31, labeled=6, unlabeled=0, test=0, shape=(8, 10, 12))
    by_topic = {f.topic: f for f in dataset_findings("31", "nnUNetPlans")}
    assert by_topic["planned"].fix == "nnUNetv2_plan_and_preprocess -d 31 --verify_dataset_integrity"
    assert "6 (imagesTr" in by_topic["labelled images"].detail
    assert "imagesUnlabeled/" in by_topic["unlabelled images"].detail
    assert "how to train" not in by_topic  # 6 labelled cases: nnU-Net's 5 folds work
