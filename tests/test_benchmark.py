"""gemini_benchmark on a tiny matrix (one N, one draw, one iteration, two methods, trained at the
same time with --jobs 2): well-formed results.json / results.md / results.png, and a second call
(one job) redoes nothing that finished."""
import glob
import json
import os
import sys

import numpy as np
import pytest
from helpers import private_demo_copy, run_command

METHODS = ["nnUNetTrainer", "nnUNetTrainerGEMINI_NoPretrain"]


@pytest.fixture(scope="module")
def tiny_study(planned_demo, tmp_path_factory):
    """The planned demo copied (the benchmark writes the split into it), then one benchmark call."""
    root = tmp_path_factory.mktemp("benchmark")
    env = private_demo_copy(planned_demo, root)
    out = root / "study"
    cmd = [sys.executable, "-m", "nnunet_gemini.benchmark", "-d", str(planned_demo.dataset_id), "--n", "3",
           "--draws", "1", "--methods", *METHODS, "--registration", "none", "--train_epochs", "1",
           "--train_iters", "1", "--val_iters", "1", "-device", "cpu", "-o", str(out)]
    first = run_command(cmd + ["--jobs", "2"], env, timeout=1200)
    return dict(cmd=cmd, env=env, out=out, first=first, dataset=planned_demo)


def test_results_json_table_and_plot(tiny_study):
    out = tiny_study["out"]
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert sorted(r["method"] for r in runs) == sorted(METHODS)
    labels = [k for k, v in json.load(open(os.path.join(tiny_study["dataset"].raw_folder, "dataset.json")))[
        "labels"].items() if v != 0]
    splits = json.load(open(os.path.join(tiny_study["env"]["nnUNet_preprocessed"], tiny_study["dataset"].dataset_name,
                                         "splits_fewshot.json")))
    for r in runs:
        assert (r["n"], r["draw"], r["iterations"], r["device"]) == (3, 0, 1, "cpu")
        fold = next(f for f in splits["folds"] if (f["n"], f["draw"]) == (3, 0))
        assert r["fold"] == fold["fold"] and r["train_cases"] == fold["train"]
        assert set(r["dice_per_structure"]) == set(labels)
        assert len(r["dice_per_case"]) == 2  # the two imagesTs cases
        assert 0.0 <= r["dice_mean"] <= 1.0
        assert r["dice_mean"] == pytest.approx(np.nanmean(list(r["dice_per_structure"].values())))
        assert r["wall_seconds"] >= r["train_seconds"] > 0
        assert r["pretrain_share_seconds"] == 0.0  # neither method loads the pre-training
    assert next(r for r in runs if r["method"] == "nnUNetTrainer")["trainer"] == "nnUNetTrainerEnvBudget"
    table = (out / "results.md").read_text()
    for method in METHODS:
        row = next(line for line in table.splitlines() if line.startswith(f"| {method} |"))
        run = next(r for r in runs if r["method"] == method)
        assert f"{run['dice_mean']:.3f} ± 0.000 (1)" in row
    assert "N = 3" in table
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # scored on imagesTs: nnU-Net's final validation was skipped (nnUNet_gemini_final_validation=0)
    folds = [p for root in (tiny_study["env"]["nnUNet_results"], str(out))
             for p in glob.glob(os.path.join(root, "**", "*__nnUNetPlans__3d_fullres", "fold_*"), recursive=True)]
    assert len(folds) == len(METHODS)
    for fold in folds:
        assert os.path.isfile(os.path.join(fold, "checkpoint_final.pth"))
        assert not os.path.exists(os.path.join(fold, "validation"))


def test_second_call_redoes_no_finished_run(tiny_study):
    out = tiny_study["out"]
    before = json.loads((out / "results.json").read_text())["runs"]
    logs = {p.name: p.stat().st_mtime_ns for p in (out / "logs").iterdir() if p.name.startswith(("train_", "predict_"))}
    assert len(logs) == 4
    second = run_command(tiny_study["cmd"], tiny_study["env"], timeout=600)
    assert second.stdout.count("done already") == 2
    assert "nnUNetv2_train" not in second.stdout and "nnUNetv2_predict" not in second.stdout
    assert json.loads((out / "results.json").read_text())["runs"] == before
    assert {p.name: p.stat().st_mtime_ns for p in (out / "logs").iterdir()
            if p.name.startswith(("train_", "predict_"))} == logs


def test_reports_aggregate_over_draws(tmp_path):
    """mean ± std over draws per (method, N), reference runs apart from the budget runs."""
    from nnunet_gemini.benchmark import write_reports

    def run(method, n, draw, dice, iterations=100, reference=False):
        return {"method": method, "n": n, "draw": draw, "iterations": iterations, "reference": reference,
                "dice_mean": dice, "dice_per_structure": {"organ": dice}, "wall_seconds": 10.0}
    results = {"dataset": "Dataset991_GeminiDemo", "budget": "short", "device": "cpu",
               "budget_iterations": {"train_epochs": 4, "train_iters": 25, "pretrain_epochs": 1, "pretrain_iters": 1},
               "runs": [run("nnUNetTrainer", 1, 0, 0.5), run("nnUNetTrainer", 1, 1, 0.7),
                        run("nnUNetTrainerGEMINI", 1, 0, 0.8), run("nnUNetTrainer", 1, 0, 0.1, iterations=50),
                        run("nnUNetTrainer", 1, 0, 0.9, iterations=1000, reference=True),
                        run("nnUNetTrainerGEMINI", 2, 0, 0.95, iterations=1000)],
               "registration": {"unregistered": {"pairs": 2, "dice_mean": 0.4, "dice_std": 0.1},
                                "zero field (same pipeline)": {"pairs": 2, "dice_mean": 0.6, "dice_std": 0.02},
                                "diffeomorphic": {"pairs": 2, "dice_mean": 0.7, "dice_std": 0.05,
                                                  "folding_fraction_mean": 0.001, "folding_fraction_max": 0.002,
                                                  "pretrain_iterations": 1}}}
    write_reports(results, tmp_path, ["nnUNetTrainer", "nnUNetTrainerGEMINI"], [1, 2], 100)
    lines = (tmp_path / "results.md").read_text().splitlines()
    assert "| nnUNetTrainer | 0.600 ± 0.100 (2) | – | 10 |" in lines
    assert "| nnUNetTrainerGEMINI | 0.800 ± 0.000 (1) | – | 10 |" in lines
    assert any(line.startswith("| nnUNetTrainer, reference 1000 it") and "0.900" in line for line in lines)
    assert any(line.startswith("| diffeomorphic") and "0.700 ± 0.050" in line and "0.00100" in line for line in lines)
    registration = [line.split(" |")[0] for line in lines if line.startswith(("| unregistered", "| zero", "| diffeo"))]
    assert registration == ["| unregistered", "| zero field (same pipeline)", "| diffeomorphic (1 pre-train it)"]
    assert (tmp_path / "results.png").is_file()
    # the budget with the most runs leads; each other one (a call with a longer budget on the same -o)
    # has a section of its own, a longer one with the stock reference of its length
    sections = [i for i, line in enumerate(lines) if line.startswith("## ")]
    assert [lines[i] for i in sections] == [f"## {k} supervised iterations per run" for k in (50, 1000)]
    assert lines.index("| nnUNetTrainer | 0.600 ± 0.100 (2) | – | 10 |") < sections[0]
    assert lines.index("| nnUNetTrainer | 0.100 ± 0.000 (1) | 10 |") in range(sections[0], sections[1])
    rows_1000 = lines[sections[1]:]
    assert "| nnUNetTrainerGEMINI | – | 0.950 ± 0.000 (1) | 10 |" in rows_1000
    assert any(line.startswith("| nnUNetTrainer, reference 1000 it") for line in rows_1000)


def test_reports_average_a_draws_repeats_first(tmp_path):
    """--repeats: a draw's runs are averaged before the mean, std and per-draw differences over draws,
    so a repeated draw weighs once; every repeated cell's runs are listed."""
    from nnunet_gemini.benchmark import write_reports

    def run(method, draw, dice, repeat=0):
        return {"method": method, "n": 1, "draw": draw, "repeat": repeat, "iterations": 100, "reference": False,
                "dice_mean": dice, "dice_per_structure": {"organ": dice}, "wall_seconds": 10.0,
                "selection": {"dice_mean": dice + 0.1}}
    results = {"dataset": "D", "budget": "short", "device": "cpu", "registration": {},
               "budget_iterations": {"train_epochs": 4, "train_iters": 25, "pretrain_epochs": 1, "pretrain_iters": 1},
               "runs": [run("nnUNetTrainer", 0, 0.5), run("nnUNetTrainer", 0, 0.7, repeat=1),
                        run("nnUNetTrainer", 1, 0.8), run("nnUNetTrainerGEMINI", 0, 0.65),
                        run("nnUNetTrainerGEMINI", 1, 0.9)]}
    write_reports(results, tmp_path, ["nnUNetTrainer", "nnUNetTrainerGEMINI"], [1], 100)
    lines = (tmp_path / "results.md").read_text().splitlines()
    assert "| nnUNetTrainer | 0.700 ± 0.100 (2 draws, 3 runs) | 10 |" in lines  # draws 0.6 and 0.8
    assert "| nnUNetTrainerGEMINI | 0.775 ± 0.125 (2) | 10 |" in lines
    assert "| nnUNetTrainerGEMINI − nnUNetTrainer | 1 | draw 0: +0.050, draw 1: +0.100 | +0.075 |" in lines
    assert "| nnUNetTrainer | 0.800 ± 0.100 (2 draws, 3 runs) |" in lines  # the selection set's
    assert "| nnUNetTrainer | 1 | 0 | 0.500, 0.700 | 0.600 ± 0.100 | 0.200 |" in lines
    assert "| nnUNetTrainer | 1 | 0.700 |" in lines  # per structure: over draws too
    assert not any(line.startswith("| nnUNetTrainerGEMINI | 1 | 0 |") for line in lines)  # not repeated: not listed


def test_pretraining_wall_time_is_shared_by_every_run_that_loads_it():
    """The share is pre-training seconds / all runs loading it, however the study was split into
    calls (a one-run ablation call does not carry the whole pre-training); runs of a replaced
    pre-training keep theirs; baselines and NoPretrain carry none."""
    from nnunet_gemini.benchmark import share_pretraining

    def run(method, label=None, **extra):
        return {"method": method, "label": label or method, "train_seconds": 100.0, "predict_seconds": 10.0,
                "pretrain_share_seconds": 0.0, "wall_seconds": 110.0, **extra}
    runs = [run("nnUNetTrainer"), run("nnUNetTrainerGEMINI_NoPretrain"), run("nnUNetTrainerGEMINI"),
            run("nnUNetTrainerGEMINIFinetune"), run("nnUNetTrainerGEMINI", "nnUNetTrainerGEMINI (weight 0.3)"),
            run("nnUNetTrainerGEMINI", pretrain_iterations=50, pretrain_share_seconds=7.0, wall_seconds=117.0),
            run("nnUNetTrainerGEMINI", reference=True)]
    results = {"runs": runs, "pretraining": {"diffeomorphic": {"iterations": 1000, "seconds": 300.0}}}
    share_pretraining(results)
    assert [r["pretrain_share_seconds"] for r in runs] == [0.0, 0.0, 100.0, 100.0, 100.0, 7.0, 0.0]
    assert [r["wall_seconds"] for r in runs] == [110.0, 110.0, 210.0, 210.0, 210.0, 117.0, 110.0]
    assert runs[2]["pretrain_iterations"] == 1000
    share_pretraining({"runs": runs, "pretraining": {}})  # no pre-training yet: nothing changes
    assert runs[2]["wall_seconds"] == 210.0


def test_ablation_is_a_row_of_its_own_and_keeps_the_main_runs(tiny_study):
    out, env = tiny_study["out"], tiny_study["env"]
    before = json.loads((out / "results.json").read_text())["runs"]
    third = run_command(tiny_study["cmd"] + ["--gemini_weight", "0.5", "--gemini_rampup", "0.5"], env, timeout=900)
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert runs[:len(before)] == before
    label = "nnUNetTrainerGEMINI_NoPretrain (weight 0.5, ramp-up 0.5 of the run)"
    (new,) = runs[len(before):]
    assert (new["label"], new["method"], new["gemini_weight"], new["gemini_rampup"]) == \
        (label, "nnUNetTrainerGEMINI_NoPretrain", 0.5, 0.5)
    assert third.stdout.count("done already") == 1  # nnUNetTrainer has no GEMINI loss: its run is the same
    logs = glob.glob(str(out / "nnUNet_results_ablation_weight0.5_rampup0.5" / "**" / "training_log_*.txt"),
                     recursive=True)
    log = open(logs[0]).read()
    assert "nnUNet_gemini_weight = 0.5 (environment)" in log and "nnUNet_gemini_rampup = 0.5 (environment)" in log
    table = (out / "results.md").read_text()
    rows = [line.split(" | ")[0][2:] for line in table.splitlines() if line.startswith("| nnUNetTrainer")]
    assert rows[:3] == ["nnUNetTrainer", "nnUNetTrainerGEMINI_NoPretrain", label]  # the ablation after its method


def test_a_run_of_another_length_keeps_the_finished_runs_model(tiny_study):
    """A call with a longer budget on the same -o trains nnUNetTrainer again (its key holds the
    iterations) in a results root of its own: the 1-iteration run's checkpoint stays as it was."""
    from nnunet_gemini.benchmark import finished_outputs, run_folder
    out, env = tiny_study["out"], tiny_study["env"]
    before = json.loads((out / "results.json").read_text())["runs"]
    first = next(r for r in before if r["method"] == "nnUNetTrainer" and r["iterations"] == 1)
    checkpoint = run_folder(env["nnUNet_results"], first["dataset"], first["trainer"], first["fold"]) / \
        "checkpoint_final.pth"
    stamp = checkpoint.stat().st_mtime_ns, checkpoint.read_bytes()
    cmd = [a for a in tiny_study["cmd"] if a != "nnUNetTrainerGEMINI_NoPretrain"]
    cmd[cmd.index("--train_iters") + 1] = "2"
    # with a reference of the same length: one training, recorded as the study's run and as the reference
    second = run_command(cmd + ["--reference_iters", "2"], env, timeout=900)
    runs = json.loads((out / "results.json").read_text())["runs"]
    new, reference = sorted(runs[len(before):], key=lambda r: r["reference"])
    assert (new["method"], new["iterations"], new["results_root"]) == ("nnUNetTrainer", 2, "nnUNet_results_2it")
    assert (reference["method"], reference["iterations"], reference["reference"]) == ("nnUNetTrainer", 2, True)
    assert second.stdout.count("] train_nnUNetTrainer_") == 1 and "the same training as" in second.stdout
    assert reference["same_run_as"] == reference["log_tag"] == new["log_tag"] and reference["wall_seconds"] == 0
    assert (reference["dice_mean"], reference["results_root"]) == (new["dice_mean"], new["results_root"])
    assert (out / "logs" / f"train_{new['log_tag']}.log").is_file()
    assert (run_folder(out / "nnUNet_results_2it", new["dataset"], new["trainer"], new["fold"]) /
            "checkpoint_final.pth").is_file()
    assert (checkpoint.stat().st_mtime_ns, checkpoint.read_bytes()) == stamp
    # a study recorded before runs named their root: two runs in one folder publish the logs of both
    old = [dict(first, results_root=None), dict(new, results_root=None)]
    _, folders = finished_outputs({"runs": old})
    assert list(folders.values()) == [set(first["training_logs"]) | set(new["training_logs"])]


def test_a_repeat_trains_again_in_a_folder_of_its_own(tiny_study):
    """--repeats 2: the finished run is repeat 0; repeat 1 trains again (nnU-Net is unseeded) in a results
    root and under a log tag of its own, and the table averages the draw's two runs."""
    from nnunet_gemini.benchmark import run_folder
    out, env = tiny_study["out"], tiny_study["env"]
    before = json.loads((out / "results.json").read_text())["runs"]
    first = next(r for r in before if r["method"] == "nnUNetTrainer" and r["iterations"] == 1)
    checkpoint = run_folder(env["nnUNet_results"], first["dataset"], first["trainer"], first["fold"]) / \
        "checkpoint_final.pth"
    stamp = checkpoint.stat().st_mtime_ns
    cmd = [a for a in tiny_study["cmd"] if a != "nnUNetTrainerGEMINI_NoPretrain"]
    second = run_command(cmd + ["--repeats", "2"], env, timeout=900)
    assert second.stdout.count("done already") == 1 and second.stdout.count("] train_nnUNetTrainer_") == 1
    (new,) = json.loads((out / "results.json").read_text())["runs"][len(before):]
    assert (new["method"], new["n"], new["draw"], new["iterations"], new["repeat"]) == ("nnUNetTrainer", 3, 0, 1, 1)
    assert (new["results_root"], new["log_tag"]) == ("nnUNet_results_repeat1", "nnUNetTrainer_N3_draw0_1it_repeat1")
    assert (out / "logs" / "train_nnUNetTrainer_N3_draw0_1it_repeat1.log").is_file()
    assert (run_folder(out / "nnUNet_results_repeat1", new["dataset"], new["trainer"], new["fold"]) /
            "checkpoint_final.pth").is_file()
    assert checkpoint.stat().st_mtime_ns == stamp
    lines = (out / "results.md").read_text().splitlines()
    mean = (first["dice_mean"] + new["dice_mean"]) / 2
    assert f"| nnUNetTrainer | {mean:.3f} ± 0.000 (1 draw, 2 runs) |" in " ".join(lines)
    assert f"| nnUNetTrainer | 3 | 0 | {first['dice_mean']:.3f}, {new['dice_mean']:.3f} |" in " ".join(lines)


def test_publish_copies_the_logs_and_plots_of_finished_runs_only(tiny_study, tmp_path):
    """benchmarks/publish_study.sh: results, the logs of finished runs (names rebuilt from results.json
    match the files the runs wrote), the preparing stages' logs, and the finished runs' training logs
    and plots, but not a killed run's log or folder."""
    import shutil
    import subprocess

    from nnunet_gemini.benchmark import finished_outputs
    out = tiny_study["out"]
    results = json.loads((out / "results.json").read_text())
    written = {p.name for p in (out / "logs").iterdir()}
    run_logs = {n for n in written if n.startswith(("train_", "predict_"))}
    logs, folders = finished_outputs(results)
    trained = [r for r in results["runs"] if "same_run_as" not in r]  # a twin's record has no logs of its own
    assert logs == run_logs and len(run_logs) == 2 * len(trained)
    src = tmp_path / "study"
    shutil.copytree(out / "logs", src / "logs")
    shutil.copy(out / "results.json", src)
    # the runs' own folders, laid out as in collection mode (the study's nnUNet_results under -o, beside
    # the ablation runs' folders that an earlier test of this module may have added)
    shutil.copytree(tiny_study["env"]["nnUNet_results"], src / "nnUNet_results")
    for ablation_results in out.glob("nnUNet_results_*"):
        shutil.copytree(ablation_results, src / ablation_results.name)
    assert len(folders) == len(trained) and all((src / f / "progress.png").is_file() for f in folders)
    # each run names the one training log its training wrote
    assert all(len(own) == 1 and (src / f / next(iter(own))).is_file() for f, own in folders.items())
    (src / "logs" / "train_nnUNetTrainerGEMINI_N3_draw0_1it.log").write_text("killed\n")
    retried = src / next(iter(folders))  # a finished run whose folder also holds a killed attempt's log
    (retried / "training_log_2000_1_1_00_00_00.txt").write_text("killed attempt\n")
    (retried / ".progress_replaced.png").write_bytes(b"finished attempt")  # a rerun going on beside it
    killed = src / "nnUNet_results" / "Dataset999_Killed" / "nnUNetTrainerGEMINI__nnUNetPlans__3d_fullres" / "fold_0"
    killed.mkdir(parents=True)
    (killed / "training_log_2026_1_1_00_00_00.txt").write_text("killed\n")
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "publish_study.sh")
    subprocess.run(["bash", script, str(src), str(tmp_path / "dest")], check=True, env=tiny_study["env"])
    assert {p.name for p in (tmp_path / "dest" / "logs").iterdir()} == written
    assert (tmp_path / "dest" / "results.json").read_text() == (out / "results.json").read_text()
    published = {str(p.relative_to(tmp_path / "dest" / "runs")) for p in (tmp_path / "dest" / "runs").rglob("*")
                 if p.is_file()}
    expected = {str(p.relative_to(src)) for f, own in folders.items() for p in (src / f).iterdir()
                if p.name in own or p.name.startswith("progress") and p.suffix == ".png"}
    assert published == expected and not any("Killed" in p or "2000_1_1" in p for p in published)
    assert (tmp_path / "dest" / "runs" / retried.relative_to(src) / "progress.png").read_bytes() == b"finished attempt"
    # a run recorded before runs named their logs: all of its folder's logs are its own
    old_record = dict(results["runs"][0])
    del old_record["training_logs"]
    _, old_folders = finished_outputs(dict(results, runs=[old_record]))
    assert list(old_folders.values()) == [None]


def test_method_labels_and_ablation_results_dir_links_the_shared_pretraining(tmp_path, monkeypatch):
    from nnunet_gemini.benchmark import Benchmark, method_label, run_tag
    from nnunet_gemini.pretrained import find_pretrained_checkpoint
    assert method_label("nnUNetTrainerGEMINI") == "nnUNetTrainerGEMINI"
    assert method_label("nnUNetTrainerGEMINI", gemini_weight=0.3) == "nnUNetTrainerGEMINI (weight 0.3)"
    assert method_label("nnUNetTrainerGEMINI_NoPretrain", gemini_rampup=0) == \
        "nnUNetTrainerGEMINI_NoPretrain (ramp-up 0 of the run)"
    # Finetune has no GEMINI loss: weight and ramp-up do not apply, the fine-tuning schedule does
    assert method_label("nnUNetTrainerGEMINIFinetune", gemini_weight=0.3, gemini_rampup=0.1) == \
        "nnUNetTrainerGEMINIFinetune"
    assert method_label("nnUNetTrainerGEMINIFinetune", gemini_warmup=0.05, gemini_lr=0.001) == \
        "nnUNetTrainerGEMINIFinetune (lr 0.001, warm-up 0.05 of the run)"
    assert method_label("nnUNetTrainer", gemini_warmup=0.05) == "nnUNetTrainer"  # stock nnU-Net stays stock
    assert method_label("nnUNetTrainerGEMINIFinetune", gemini_transfer="encoder", pretrain_decorrelation=10.0) == \
        "nnUNetTrainerGEMINIFinetune (transfer encoder, pre-training decorrelation 10)"
    assert method_label("nnUNetTrainerGEMINI_NoPretrain", gemini_transfer="encoder") == \
        "nnUNetTrainerGEMINI_NoPretrain"  # nothing to transfer
    assert run_tag("nnUNetTrainerGEMINIFinetune", {"gemini_transfer": "encoder"}, 1, 0, 500) == \
        "nnUNetTrainerGEMINIFinetune_transferencoder_N1_draw0_500it"
    assert method_label("nnUNetTrainerGEMINI", gemini_pair_positions="independent", gemini_deformer_lr=0.001) == \
        "nnUNetTrainerGEMINI (pairs at independent positions, deformer lr 0.001)"
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    bench = Benchmark.__new__(Benchmark)
    bench.out, bench.collection_mode, bench.pretrain_ablation = tmp_path / "study", False, {}
    bench.deformation = "diffeomorphic"
    bench.folders = {"nnUNet_results": str(tmp_path / "results")}
    cell = {"dataset_name": "Dataset991_GeminiDemo", "pretrain_dataset": "Dataset991_GeminiDemo"}
    shared = bench._pretrain_checkpoint("diffeomorphic", "Dataset991_GeminiDemo")
    shared.parent.mkdir(parents=True)
    shared.write_bytes(b"pre-trained")
    folder = str(tmp_path / "study" / "nnUNet_results_ablation_weight0.3")
    bench._link_pretraining(folder, cell)
    bench._link_pretraining(folder, cell)  # the link exists: fine
    monkeypatch.setenv("nnUNet_results", folder)  # what the ablation's trainer sees
    found = find_pretrained_checkpoint("Dataset991_GeminiDemo", "nnUNetPlans", "3d_fullres")
    assert found is not None and open(found, "rb").read() == b"pre-trained"
    # a collection study: another dataset of the same plans group finds the group's pre-training
    bench._link_pretraining(str(tmp_path / "results"), {"dataset_name": "Dataset902_GeminiStudyN2draw0",
                                                        "pretrain_dataset": "Dataset991_GeminiDemo"})
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    found = find_pretrained_checkpoint("Dataset902_GeminiStudyN2draw0", "nnUNetPlans", "3d_fullres")
    assert found is not None and open(found, "rb").read() == b"pre-trained"


@pytest.mark.parametrize("flag", [["--jobs", "0"], ["--draws", "0"], ["--n", "0"], ["--train_iters", "-1"],
                                  ["--gemini_weight", "-1"], ["--gemini_weight", "nan"], ["--gemini_weight", "0"],
                                  ["--gemini_rampup", "-0.1"], ["--gemini_rampup", "2"], ["--gemini_warmup", "1.5"],
                                  ["--gemini_lr", "0"], ["--gemini_deformer_lr=-1e-4"],
                                  ["--pretrain_decorrelation=-1"], ["--pretrain_encoder_decorrelation", "inf"],
                                  ["--pretrain_restoration_weight", "0"], ["--pretrain_lr", "0"],
                                  ["--pretrain_deformer_lr", "inf"]])
def test_out_of_range_counts_and_weights_are_refused_before_anything_runs(flag, tmp_path, capsys):
    from nnunet_gemini.benchmark import main
    with pytest.raises(SystemExit) as exit_info:
        main(flag + ["-o", str(tmp_path / "out"), "--own_nnunet_folders"])
    assert exit_info.value.code != 0
    assert "must be" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_augmentation_workers_per_training():
    from nnunet_gemini.benchmark import training_n_proc_da
    assert training_n_proc_da("cpu", 1, "8") == "0"  # CPU: in-process augmentation, whatever the shell says
    assert training_n_proc_da("cuda", 1, None) is None  # nnU-Net's own default
    assert training_n_proc_da("cuda", 8, " 6 ") == "6"  # the user's value wins
    assert training_n_proc_da("cuda", 8, None, cpu_count=16) == "1"  # 8 trainings share 16 cores
    assert training_n_proc_da("cuda", 4, "", cpu_count=16) == "3"
    assert training_n_proc_da("cuda", 32, None, cpu_count=16) == "1"


def test_report_covers_every_n_of_the_budget_not_only_this_calls():
    """A call for N = 2 after one for N = 1 rebuilds results.md with both columns (same budget only)."""
    from types import SimpleNamespace

    from nnunet_gemini.benchmark import Benchmark
    budget = dict(train_epochs=2, train_iters=250)
    runs = [dict(n=1, iterations=500), dict(n=5, iterations=100), dict(n=2, iterations=500)]
    study = SimpleNamespace(budget=budget, results={"runs": runs})
    assert Benchmark.report_ns(study, [2]) == [1, 2]
    assert Benchmark.report_ns(study, [3]) == [1, 2, 3]


def _pretraining_benchmark(out, pretrain_ablation):
    """A collection-mode Benchmark with only what pretrain() and the pre-training keys read."""
    from nnunet_gemini.benchmark import Benchmark
    bench = Benchmark.__new__(Benchmark)
    bench.out, bench.collection_mode, bench.device, bench.revision = out, True, "cpu", "abc"
    bench.folders = {"nnUNet_results": str(out / "nnUNet_results")}
    bench.budget = dict(pretrain_epochs=1, pretrain_iters=2)
    bench.results, bench.n_proc_da_pretrain, bench._save = {"pretraining": {}, "registration": {}}, None, lambda: None
    bench.pretrain_ablation, bench.deformation = pretrain_ablation, "diffeomorphic"
    return bench


def _fake_pretrain_runs(bench, checkpoint, content, seconds):
    """Stand in for the gemini_pretrain subprocess: record (stage, command), write the checkpoint."""
    commands = []

    def run(stage, cmd, extra_env=None):
        commands.append((stage, cmd))
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.write_bytes(content)
        return seconds
    bench.run = run
    return commands


def test_pretraining_ablation_has_its_own_key_checkpoint_command_and_rows(tmp_path, monkeypatch):
    """--pretrain_decorrelation W: this call's pre-training runs with gemini_pretrain --decorrelation W
    into a folder of its own, is recorded under its own key, and is linked where the ablation's trainers
    look; only the methods that load a pre-training get the row label."""
    from nnunet_gemini.benchmark import finished_outputs, method_label
    from nnunet_gemini.pretrained import find_pretrained_checkpoint
    assert method_label("nnUNetTrainerGEMINIFinetune", pretrain_decorrelation=10.0) == \
        "nnUNetTrainerGEMINIFinetune (pre-training decorrelation 10)"
    assert method_label("nnUNetTrainerGEMINI_NoPretrain", pretrain_decorrelation=10.0) == \
        "nnUNetTrainerGEMINI_NoPretrain"
    assert method_label("nnUNetTrainerGEMINI", pretrain_restoration_weight=10.0, pretrain_decorrelation=10.0,
                        pretrain_encoder_decorrelation=1.0) == "nnUNetTrainerGEMINI (pre-training decorrelation 10, " \
        "pre-training encoder decorrelation 1, pre-training restoration weight 10)"
    bench = _pretraining_benchmark(tmp_path / "study", {"pretrain_decorrelation": 10.0})
    name = "Dataset901_GeminiStudyN1draw0"
    key = bench._pretraining_key("diffeomorphic", name)
    assert key == "diffeomorphic:Dataset901_GeminiStudyN1draw0 (pre-training decorrelation 10)"
    checkpoint = bench._pretrain_checkpoint("diffeomorphic", name)
    assert checkpoint == tmp_path / "study" / f"pretrain_diffeomorphic_pretrain_decorrelation10_{name}" / \
        "checkpoint_final.pth"
    commands = _fake_pretrain_runs(bench, checkpoint, b"decorrelated", 1.0)
    record = bench.pretrain("diffeomorphic", name)
    ((stage, cmd),) = commands
    assert cmd[cmd.index("--decorrelation") + 1] == "10" and cmd[cmd.index("-o") + 1] == str(checkpoint.parent)
    assert stage == checkpoint.parent.name and record["pretrain_decorrelation"] == 10.0
    assert finished_outputs({"runs": [], "pretraining": bench.results["pretraining"], "collection": {}}) == \
        ({f"{stage}.log"}, {stage: set(record["training_logs"])})
    standard = _pretraining_benchmark(tmp_path / "study", {})  # the one the trainers find, in nnUNet_results
    plain = {"deformation": "diffeomorphic", "dataset": name}
    assert finished_outputs({"runs": [], "pretraining": {"k": plain}, "collection": {}}) == \
        ({f"pretrain_diffeomorphic_{name}.log"},
         {str(standard._pretrain_checkpoint("diffeomorphic", name).parent.relative_to(tmp_path / "study")): None})
    assert bench.results["pretraining"][key] is record and bench.pretrain("diffeomorphic", name) is record
    folder = str(tmp_path / "study" / "nnUNet_results_ablation_pretrain_decorrelation10")
    bench._link_pretraining(folder, {"dataset_name": "Dataset903_GeminiStudyN2draw0", "pretrain_dataset": name})
    monkeypatch.setenv("nnUNet_results", folder)
    found = find_pretrained_checkpoint("Dataset903_GeminiStudyN2draw0", "nnUNetPlans", "3d_fullres")
    assert found is not None and open(found, "rb").read() == b"decorrelated"


def test_deformation_ablation_loads_a_pretraining_of_its_model(tmp_path, monkeypatch):
    """--gemini_deformation displacement: every GEMINI trainer's row of its own (stock nnU-Net stays
    stock), a gemini_pretrain --deformation displacement run in a folder of its own under its own key,
    linked where the ablation's trainers look; its runs carry that pre-training's seconds."""
    from nnunet_gemini.benchmark import method_label, registered_deformations, run_tag, share_pretraining
    from nnunet_gemini.pretrained import find_pretrained_checkpoint
    assert method_label("nnUNetTrainerGEMINI", gemini_deformation="displacement", pretrain_decorrelation=10.0) == \
        "nnUNetTrainerGEMINI (deformation displacement, pre-training decorrelation 10)"
    assert method_label("nnUNetTrainerGEMINI_NoPretrain", gemini_deformation="displacement") == \
        "nnUNetTrainerGEMINI_NoPretrain (deformation displacement)"
    assert method_label("nnUNetTrainer", gemini_deformation="displacement") == "nnUNetTrainer"
    assert run_tag("nnUNetTrainerGEMINI", {"gemini_deformation": "displacement"}, 1, 0, 500) == \
        "nnUNetTrainerGEMINI_deformationdisplacement_N1_draw0_500it"
    # registration: with --collection, of the model the runs load unless --registration says otherwise
    assert registered_deformations(None, True, "displacement") == ("displacement",)
    assert registered_deformations(None, True, "diffeomorphic") == ("diffeomorphic",)
    assert registered_deformations(None, False, "displacement") == ("diffeomorphic", "displacement")
    assert registered_deformations("none", True, "displacement") == ()
    assert registered_deformations("diffeomorphic", True, "displacement") == ("diffeomorphic",)
    bench = _pretraining_benchmark(tmp_path / "study", {"pretrain_decorrelation": 10.0})
    bench.deformation = "displacement"
    name = "Dataset901_GeminiStudyN1draw0"
    key = bench._pretraining_key("displacement", name)
    assert key == "displacement:Dataset901_GeminiStudyN1draw0 (pre-training decorrelation 10)"
    checkpoint = bench._pretrain_checkpoint("displacement", name)
    assert checkpoint.parent == tmp_path / "study" / f"pretrain_displacement_pretrain_decorrelation10_{name}"
    commands = _fake_pretrain_runs(bench, checkpoint, b"displacement", 120.0)
    record = bench.pretrain("displacement", name)
    ((_, cmd),) = commands
    assert cmd[cmd.index("--deformation") + 1] == "displacement" and cmd[cmd.index("-o") + 1] == str(checkpoint.parent)
    assert record["deformation"] == "displacement"
    folder = str(tmp_path / "study" / "nnUNet_results_ablation_deformationdisplacement_pretrain_decorrelation10")
    bench._link_pretraining(folder, {"dataset_name": "Dataset903_GeminiStudyN2draw0", "pretrain_dataset": name})
    monkeypatch.setenv("nnUNet_results", folder)
    found = find_pretrained_checkpoint("Dataset903_GeminiStudyN2draw0", "nnUNetPlans", "3d_fullres")
    assert found is not None and open(found, "rb").read() == b"displacement"
    runs = [{"method": m, "label": m, "train_seconds": 100.0, "predict_seconds": 10.0, "pretrain_share_seconds": 0.0,
             "wall_seconds": 110.0, "pretraining": key} for m in ("nnUNetTrainerGEMINI", "nnUNetTrainerGEMINIFinetune")]
    share_pretraining({"runs": runs, "pretraining": bench.results["pretraining"]})
    assert [r["pretrain_share_seconds"] for r in runs] == [60.0, 60.0]


@pytest.mark.parametrize("key,flag,label,value,shown", [
    ("pretrain_restoration_weight", "--restoration_weight", "restoration weight", 10.0, "10"),
    ("pretrain_encoder_decorrelation", "--encoder_decorrelation", "encoder decorrelation", 10.0, "10"),
    ("pretrain_lr", "--lr", "lr", 10.0, "10"), ("pretrain_deformer_lr", "--deformer_lr", "deformer lr", 10.0, "10"),
    ("pretrain_deformer_input", "--deformer_input", "deformer sees", "images", "images"),
    ("pretrain_seed", "--seed", "seed", 1, "1")])
def test_pretraining_ablation_passes_its_flag_to_gemini_pretrain(key, flag, label, value, shown, tmp_path):
    """--pretrain_restoration_weight / --pretrain_encoder_decorrelation W, --pretrain_lr /
    --pretrain_deformer_lr LR, --pretrain_deformer_input WHAT, --pretrain_seed N: gemini_pretrain FLAG
    value into a folder of its own, under a key of its own."""
    bench = _pretraining_benchmark(tmp_path, {key: value})
    name = "Dataset901_GeminiStudyN1draw0"
    checkpoint = bench._pretrain_checkpoint("diffeomorphic", name)
    assert checkpoint.parent == tmp_path / f"pretrain_diffeomorphic_{key}{shown}_{name}"
    commands = _fake_pretrain_runs(bench, checkpoint, b"x", 1.0)
    record = bench.pretrain("diffeomorphic", name)
    ((_, cmd),) = commands
    assert cmd[cmd.index(flag) + 1] == shown and cmd[cmd.index("--decorrelation") + 1] == "0"  # the released weight
    assert record[key] == value
    assert bench._pretraining_key("diffeomorphic", name).endswith(f"(pre-training {label} {shown})")


def test_a_repeat_loads_a_pretraining_seeded_above_the_calls_seed(tmp_path):
    """--repeats: repeat r of a pre-trained method loads a pre-training with seed (this call's seed + r),
    under the key and in the folder that --pretrain_seed of that value would use; repeat 0 loads this
    call's; runs and pre-trainings of a repeat are named apart from the first."""
    from nnunet_gemini.benchmark import finished_outputs, results_root_name, run_tag
    from nnunet_gemini.choices import PRETRAIN_DEFAULTS
    assert run_tag("nnUNetTrainerGEMINI", {}, 1, 0, 500, repeat=2) == "nnUNetTrainerGEMINI_N1_draw0_500it_repeat2"
    assert results_root_name(False, {}, repeat=1) == "nnUNet_results_repeat1"
    assert results_root_name(False, {"gemini_weight": 0.3}, 500, 2) == "nnUNet_results_ablation_weight0.3_500it_repeat2"
    name, seed = "Dataset901_GeminiStudyN1draw0", PRETRAIN_DEFAULTS["seed"]
    bench = _pretraining_benchmark(tmp_path, {"pretrain_decorrelation": 10.0})
    assert bench.pretrain_flags(0) == {"pretrain_decorrelation": 10.0}
    assert list(bench.pretrain_flags(2).items()) == [("pretrain_decorrelation", 10.0), ("pretrain_seed", seed + 2)]
    assert _pretraining_benchmark(tmp_path, {"pretrain_seed": 5}).pretrain_flags(1) == {"pretrain_seed": 6}
    plain = _pretraining_benchmark(tmp_path, {})
    seeded = _pretraining_benchmark(tmp_path, {"pretrain_seed": seed + 1})  # a --pretrain_seed call's
    assert plain._pretraining_key("diffeomorphic", name, 1) == seeded._pretraining_key("diffeomorphic", name) == \
        f"diffeomorphic:{name} (pre-training seed {seed + 1})"
    checkpoint = plain._pretrain_checkpoint("diffeomorphic", name, 1)
    assert checkpoint == seeded._pretrain_checkpoint("diffeomorphic", name) != \
        plain._pretrain_checkpoint("diffeomorphic", name)
    commands = _fake_pretrain_runs(plain, checkpoint, b"repeat 1", 1.0)
    record = plain.pretrain("diffeomorphic", name, repeat=1)
    ((stage, cmd),) = commands
    assert cmd[cmd.index("--seed") + 1] == str(seed + 1) and cmd[cmd.index("-o") + 1] == str(checkpoint.parent)
    assert record["pretrain_seed"] == seed + 1 and stage == checkpoint.parent.name
    assert plain.results["pretraining"] == {plain._pretraining_key("diffeomorphic", name, 1): record}
    logs, folders = finished_outputs({"runs": [], "pretraining": plain.results["pretraining"], "collection": {}})
    assert logs == {f"{stage}.log"} and list(folders) == [stage]


def test_pretraining_length_ablation_runs_beside_the_budgets_pretraining(tmp_path):
    """--pretrain_length E: gemini_pretrain --epochs E (once) into a folder and key of its own,
    recorded with E x --pretrain_iters iterations; the budget's pre-training and its record stay
    as they were, and a second call reuses the longer one."""
    from nnunet_gemini.benchmark import main, method_label
    assert method_label("nnUNetTrainerGEMINI", pretrain_length=20) == "nnUNetTrainerGEMINI (pre-training 20 epochs)"
    name = "Dataset901_GeminiStudyN1draw0"
    standard = _pretraining_benchmark(tmp_path, {})
    _fake_pretrain_runs(standard, standard._pretrain_checkpoint("diffeomorphic", name), b"budget", 1.0)
    budget_record = dict(standard.pretrain("diffeomorphic", name))
    assert budget_record["iterations"] == 2
    bench = _pretraining_benchmark(tmp_path, {"pretrain_length": 20})
    bench.results = standard.results
    key = bench._pretraining_key("diffeomorphic", name)
    assert key == f"diffeomorphic:{name} (pre-training 20 epochs)"
    checkpoint = bench._pretrain_checkpoint("diffeomorphic", name)
    assert checkpoint.parent == tmp_path / f"pretrain_diffeomorphic_pretrain_length20_{name}"
    commands = _fake_pretrain_runs(bench, checkpoint, b"long", 1.0)
    record = bench.pretrain("diffeomorphic", name)
    ((_, cmd),) = commands
    assert cmd.count("--epochs") == 1 and cmd[cmd.index("--epochs") + 1] == "20"
    # unset, the decorrelation weights are the released 0, not gemini_pretrain's defaults (a plain row's meaning)
    assert cmd[cmd.index("--decorrelation") + 1] == "0" and cmd[cmd.index("--encoder_decorrelation") + 1] == "0"
    assert record["iterations"] == 40 and record["pretrain_length"] == 20
    assert standard.results["pretraining"][standard._pretraining_key("diffeomorphic", name)] == budget_record
    assert bench.pretrain("diffeomorphic", name) is record and len(commands) == 1
    bench.results["registration"][key] = {"pretrain_iterations": 40}
    assert bench.registration_recorded("diffeomorphic", name)
    with pytest.raises(SystemExit) as e:
        main(["--pretrain_length", "0", "-o", str(tmp_path / "out")])
    assert e.value.code != 0
    with pytest.raises(SystemExit) as e:  # a seed may be 0, not negative
        main(["--pretrain_seed", "-1", "-o", str(tmp_path / "out")])
    assert e.value.code != 0


def _pretraining_checkpoint(path, epoch, iteration, epoch_seconds=10.0):
    """A file gemini_pretrain's checkpoint reader accepts, with the progress the benchmark reads."""
    import torch

    from nnunet_gemini.checkpoints import KIND_PRETRAIN
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"gemini_kind": KIND_PRETRAIN, "epoch": epoch, "iteration": iteration,
                "logging": {"epochs": {"epoch_time_s": [epoch_seconds] * epoch}}}, str(path))


def test_a_longer_pretraining_continues_the_longest_shorter_one_and_an_interrupted_one_resumes(tmp_path):
    """--pretrain_length E continues (gemini_pretrain --c) the longest finished pre-training with the
    same flags and fewer iterations, from a copy of its checkpoint; the record says from where and
    counts the earlier epochs' seconds. A pre-training whose folder holds an interrupted run's
    checkpoint_latest.pth resumes it, unless that checkpoint is cut into other epochs or is past
    this length."""
    from nnunet_gemini.pretrained import LATEST_CHECKPOINT
    name = "Dataset901_GeminiStudyN1draw0"
    flags = {"pretrain_decorrelation": 10.0}
    results = {"pretraining": {}, "registration": {}}
    sources = {}
    for length, ablation in ((None, {}), (3, flags), (5, flags), (8, {"pretrain_decorrelation": 5.0})):
        b = _pretraining_benchmark(tmp_path, dict(ablation, **({"pretrain_length": length} if length else {})))
        b.results = results
        checkpoint = b._pretrain_checkpoint("diffeomorphic", name)
        _fake_pretrain_runs(b, checkpoint, b"x", 1.0)
        b.pretrain("diffeomorphic", name)
        epochs = length or 1
        _pretraining_checkpoint(checkpoint, epochs, 2 * epochs)
        sources[length] = checkpoint
    # the 5-epoch run (10 iterations) is the longest shorter one with the same flags: not 8 (other flags)
    bench = _pretraining_benchmark(tmp_path, dict(flags, pretrain_length=7))
    bench.results = results
    checkpoint = bench._pretrain_checkpoint("diffeomorphic", name)
    commands = _fake_pretrain_runs(bench, checkpoint, b"length 7", 1.0)
    record = bench.pretrain("diffeomorphic", name)
    ((_, cmd),) = commands
    assert "--c" in cmd and cmd[cmd.index("-o") + 1] == str(checkpoint.parent)
    latest = checkpoint.parent / LATEST_CHECKPOINT
    assert latest.read_bytes() == sources[5].read_bytes() and not latest.is_symlink()  # a copy of the source
    assert record["iterations"] == 14 and record["resumed_from_iteration"] == 10
    assert record["continued_from"] == f"diffeomorphic:{name} (pre-training decorrelation 10, pre-training 5 epochs)"
    assert record["resumed_seconds"] == 50.0 and record["seconds"] == 51.0  # 5 logged epochs + this call
    # an interrupted run: its folder's checkpoint_latest.pth (4 of 6 epochs) is resumed, not restarted
    for done, per_epoch, resumed in ((4, 2, True), (4, 3, False), (7, 2, False)):
        out = tmp_path / f"interrupted_{done}_{per_epoch}"
        bench = _pretraining_benchmark(out, dict(flags, pretrain_length=6))
        checkpoint = bench._pretrain_checkpoint("diffeomorphic", name)
        _pretraining_checkpoint(checkpoint.with_name(LATEST_CHECKPOINT), done, done * per_epoch)
        commands = _fake_pretrain_runs(bench, checkpoint, b"x", 1.0)
        record = bench.pretrain("diffeomorphic", name)
        ((_, cmd),) = commands
        assert ("--c" in cmd) == resumed and ("continued_from" not in record)
        assert record.get("resumed_from_iteration") == (done * per_epoch if resumed else None)
        assert record["seconds"] == (41.0 if resumed else 1.0)
    # the budget's own pre-training never continues another (no --pretrain_length)
    bench = _pretraining_benchmark(tmp_path / "budget", flags)
    bench.results = {"pretraining": dict(results["pretraining"]), "registration": {}}
    commands = _fake_pretrain_runs(bench, bench._pretrain_checkpoint("diffeomorphic", name), b"x", 1.0)
    bench.pretrain("diffeomorphic", name)
    assert "--c" not in commands[0][1]


def test_a_rerun_pretraining_is_a_new_attempt_and_keeps_the_one_it_replaces(tmp_path):
    """A recorded pre-training run again (its checkpoint lost) leaves the replaced record, with its
    registration record, in pretraining_replaced; its own log and plot carry the attempt; each
    run carries its attempt's seconds over all runs of that pre-training (a rerun is a recovery cost)."""
    from nnunet_gemini.benchmark import finished_outputs, share_pretraining, write_reports
    bench = _pretraining_benchmark(tmp_path / "study", {"pretrain_decorrelation": 10.0})
    name = "Dataset901_GeminiStudyN1draw0"
    key = bench._pretraining_key("diffeomorphic", name)
    checkpoint = bench._pretrain_checkpoint("diffeomorphic", name)
    checkpoint.parent.mkdir(parents=True)
    (checkpoint.parent / "progress.png").write_bytes(b"attempt 0")  # no checkpoint: it is lost
    (checkpoint.parent / "training_log_2026_1_1_00_00_00.txt").write_text("attempt 0\n")
    old = {"deformation": "diffeomorphic", "dataset": name, "checkpoint": str(checkpoint), "iterations": 2,
           "seconds": 300.0, "device": "cpu", "revision": "old", "pretrain_decorrelation": 10.0,
           "training_logs": ["training_log_2026_1_1_00_00_00.txt"]}
    registration = {"deformation": "diffeomorphic", "pretrain_iterations": 2, "pairs": 2, "dice_mean": 0.5,
                    "dice_std": 0.1}
    bench.results = {"pretraining": {key: dict(old)}, "registration": {key: registration}}
    stages = []

    def run(stage, cmd, extra_env=None):
        stages.append(stage)
        (checkpoint.parent / "progress.png").write_bytes(b"attempt 1")
        (checkpoint.parent / "training_log_2026_1_2_00_00_00.txt").write_text("attempt 1\n")
        checkpoint.write_bytes(b"x")
        return 100.0
    bench.run = run
    record = bench.pretrain("diffeomorphic", name)
    assert stages == [f"{checkpoint.parent.name}_attempt1"] and record["attempt"] == 1 and record["seconds"] == 100.0
    (replaced,) = bench.results["pretraining_replaced"]
    assert {k: replaced[k] for k in old} == old and replaced["key"] == key and "attempt" not in replaced
    assert replaced["registration"] == registration and key not in bench.results["registration"]
    assert (checkpoint.parent / "progress.png").read_bytes() == b"attempt 0"
    assert (checkpoint.parent / "progress_attempt1.png").read_bytes() == b"attempt 1"
    assert not (checkpoint.parent / ".progress_replaced.png").exists()
    assert bench.pretrain("diffeomorphic", name) is record  # its checkpoint is there now
    logs, folders = finished_outputs({"runs": [], "collection": {}, **bench.results})
    assert logs == {f"{checkpoint.parent.name}.log", f"{checkpoint.parent.name}_attempt1.log"}
    # the training logs in its folder when each attempt finished; a third attempt's, written while it
    # runs in the same folder, is not published before it is recorded
    assert record["training_logs"] == ["training_log_2026_1_1_00_00_00.txt", "training_log_2026_1_2_00_00_00.txt"]
    (checkpoint.parent / "training_log_2026_1_3_00_00_00.txt").write_text("attempt 2, running\n")
    assert folders == {checkpoint.parent.name: set(record["training_logs"])}

    def loading(attempt=None, **extra):
        r = {"method": "nnUNetTrainerGEMINI", "label": "g", "train_seconds": 10.0, "predict_seconds": 0.0,
             "pretrain_share_seconds": 0.0, "wall_seconds": 10.0, "pretraining": key, "pretrain_iterations": 2}
        return dict(r, **({} if attempt is None else {"pretraining_attempt": attempt}), **extra)
    runs = [loading(), loading(0), loading(0), loading(1), loading(1, method="nnUNetTrainerGEMINIFinetune")]
    share_pretraining(dict(bench.results, runs=runs))
    assert [r["pretrain_share_seconds"] for r in runs] == [60.0, 60.0, 60.0, 20.0, 20.0]  # over all 5 loading it
    # the replaced deformer's registration row stays in the report
    results = dict(bench.results, runs=[], budget_iterations=dict(train_epochs=1, train_iters=1, pretrain_epochs=1,
                                                                 pretrain_iters=2))
    write_reports(results, tmp_path, [], [1], 1)
    assert f"| {key} (attempt 0, replaced) (2 pre-train it) | 2 | 0.500 ± 0.100 |" in \
        (tmp_path / "results.md").read_text()


def test_a_reference_run_and_the_studys_run_of_its_cell_keep_logs_of_their_own():
    """nnUNetTrainer's --reference_iters run and the study's nnUNetTrainer run of the same cell and
    length log under different names; records without log_tag (older studies) keep the plain name."""
    from nnunet_gemini.benchmark import finished_outputs, recorded_run_tag, run_tag
    plain, reference = run_tag("nnUNetTrainer", {}, 1, 0, 1250), run_tag("nnUNetTrainer", {}, 1, 0, 1250, True)
    assert plain == "nnUNetTrainer_N1_draw0_1250it" and reference == plain + "_reference"
    run = {"method": "nnUNetTrainer", "trainer": "nnUNetTrainer", "n": 1, "draw": 0, "iterations": 1250,
           "dataset": "Dataset901_X", "fold": "all"}
    old_reference = dict(run, reference=True)
    runs = [dict(run, reference=False, log_tag=plain), dict(run, reference=True, log_tag=reference)]
    assert [recorded_run_tag(r) for r in runs] == [plain, reference] and recorded_run_tag(old_reference) == plain
    logs, _ = finished_outputs({"runs": runs})
    assert logs == {f"{kind}_{tag}.log" for kind in ("train", "predict") for tag in (plain, reference)}


def test_a_study_run_of_a_references_cell_and_length_is_recorded_from_it_not_trained_again(tmp_path):
    """A --reference_iters run finished in an earlier call: the study's nnUNetTrainer run of that cell and
    length is the same training, recorded from it (no time of its own); other methods and lengths are not."""
    import threading

    from nnunet_gemini.benchmark import Benchmark, _budget_lines, _run_key
    bench = Benchmark.__new__(Benchmark)
    bench._lock, bench._save = threading.Lock(), lambda: None
    reference = {"method": "nnUNetTrainer", "label": "nnUNetTrainer", "trainer": "nnUNetTrainerEnvBudget", "n": 2,
                 "draw": 0, "iterations": 1250, "reference": True, "dataset": "Dataset903_X", "fold": "all",
                 "dice_mean": 0.79, "dice_per_structure": {"label_1": 0.79}, "dice_per_case": {"c": 0.79},
                 "selection": {"dice_mean": 0.82}, "train_seconds": 900.0, "wall_seconds": 1000.0}
    bench.results = {"runs": [reference]}
    assert bench._same_training(("nnUNetTrainer", 2, 0, 500, False, 0)) is None  # another length
    assert bench._same_training(("nnUNetTrainerGEMINI", 2, 0, 1250, False, 0)) is None  # another method
    assert bench._same_training(("nnUNetTrainer", 2, 0, 1250, False, 1)) is None  # a repeat is a training of its own
    twin = bench._same_training(("nnUNetTrainer", 2, 0, 1250, False, 0))
    assert bench.results["runs"] == [reference, twin] and _run_key(twin) == ("nnUNetTrainer", 2, 0, 1250, False, 0)
    assert (twin["dice_mean"], twin["selection"], twin["wall_seconds"]) == (0.79, {"dice_mean": 0.82}, 0.0)
    assert twin["results_root"] == "nnUNet_results_reference"  # where its checkpoint lies
    assert twin["same_run_as"] == twin["log_tag"] == "nnUNetTrainer_N2_draw0_1250it"  # an older record's plain tag
    assert bench._finished(_run_key(twin)) is twin
    # the report's wall time per run counts the trained run only
    study = dict(reference, reference=False, n=2, draw=1, wall_seconds=600.0)
    table = "\n".join(_budget_lines({"runs": [reference, twin, study]}, ["nnUNetTrainer"], [2], 1250, []))
    assert "| nnUNetTrainer | 0.790 ± 0.000 (2) | 600 |" in table


def test_deformer_input_ablation_rows():
    """--gemini_deformer_input sets what NoPretrain's fresh deformer sees (a row of its own); the methods
    that load a pre-training get theirs from it (--pretrain_deformer_input), so their rows stay plain."""
    from nnunet_gemini.benchmark import method_label, run_tag
    assert method_label("nnUNetTrainerGEMINI_NoPretrain", gemini_deformer_input="images") == \
        "nnUNetTrainerGEMINI_NoPretrain (deformer sees images)"
    assert method_label("nnUNetTrainerGEMINI", gemini_deformer_input="images") == "nnUNetTrainerGEMINI"
    assert method_label("nnUNetTrainerGEMINI", pretrain_deformer_input="images") == \
        "nnUNetTrainerGEMINI (pre-training deformer sees images)"
    assert run_tag("nnUNetTrainerGEMINI_NoPretrain", {"gemini_deformer_input": "images"}, 1, 0, 500) == \
        "nnUNetTrainerGEMINI_NoPretrain_deformer_inputimages_N1_draw0_500it"
