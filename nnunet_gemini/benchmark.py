"""`gemini_benchmark`: label-efficiency study of the GEMINI trainers against nnU-Net.

For each N labelled cases and draw (the folds of gemini_fewshot_split), every method trains with
THE SAME number of supervised iterations (nnUNet_gemini_* budget variables), predicts imagesTs
with nnUNetv2_predict and is scored against labelsTs (Dice per structure, mean foreground Dice,
per-case means). The plain baseline runs as nnUNetTrainerEnvBudget (nnUNetTrainer honouring the
budget) and is reported as "nnUNetTrainer". One gemini_pretrain run serves every method that
loads it; its wall time is shared out equally among all runs in results.json that load it.
Registration quality of the pre-trained deformer(s) (warped-label Dice over ordered test pairs,
folding fraction) comes from gemini_register's Python API.

Every stage is a real console command in a subprocess (logs in OUT/logs/). Resumable: each
finished run is written atomically into OUT/results.json and skipped by a later call; the
Markdown table (results.md) and plot (results.png) are rebuilt from it every time.
"""
import argparse
import json
import math
import os
import platform
import shutil
import sys
import textwrap
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from nnunet_gemini.atomic import write_json_atomic
from nnunet_gemini.choices import (
    DEFORMATIONS,
    DEFORMER_INPUTS,
    PAIR_POSITIONS,
    PRETRAIN_DEFAULTS,
    RELEASED_DECORRELATION,
    TRANSFERS,
)
from nnunet_gemini.datasets import dataset_id_of
from nnunet_gemini.errors import GeminiUserError, run_cli
from nnunet_gemini.workflow import StageRunner, default_device, nnunet_folders, project_revision, score_predictions

# Iteration counts per budget (epochs x iterations per epoch; val = validation iterations per epoch).
# short (named quick before; gemini_demo has a quick budget of its own) fits the default matrix
# (3 N x 3 draws x 4 methods + the two pre-trainings) in about two hours on an idle 2-core CPU (the
# per-iteration costs behind that: docs/design.md). Such short trainings measure the head start a
# method gives, not where it converges: use standard/paper (or a GPU) for that.
BUDGETS = {
    "short": dict(pretrain_epochs=4, pretrain_iters=25, train_epochs=2, train_iters=10, val_iters=1, tta=False),
    "standard": dict(pretrain_epochs=50, pretrain_iters=100, train_epochs=50, train_iters=100, val_iters=10,
                     tta=True),
    "paper": dict(pretrain_epochs=800, pretrain_iters=250, train_epochs=1000, train_iters=250, val_iters=50,
                  tta=True),
}
METHODS = ("nnUNetTrainer", "nnUNetTrainerGEMINIFinetune", "nnUNetTrainerGEMINI_NoPretrain", "nnUNetTrainerGEMINI")
TRAINER_OF = {"nnUNetTrainer": "nnUNetTrainerEnvBudget"}   # reported name -> trainer that honours the budget
USES_PRETRAINING = {"nnUNetTrainerGEMINI", "nnUNetTrainerGEMINIFinetune"}
USES_GEMINI_LOSS = {"nnUNetTrainerGEMINI", "nnUNetTrainerGEMINI_NoPretrain"}
GEMINI_TRAINERS = USES_GEMINI_LOSS | {"nnUNetTrainerGEMINIFinetune"}  # read the nnUNet_gemini_* run options
FRESH_DEFORMER = {"nnUNetTrainerGEMINI_NoPretrain"}  # its deformer is not loaded from a pre-training
# ablation flag -> (trainer option it sets, how its row is labelled, the methods it applies to, what it
# is, its default in the trainers); an ablation's runs are rows of their own, e.g.
# "nnUNetTrainerGEMINI (weight 0.3, warm-up 0.05 of the run)"
RELEASED_NOT_DEFAULT = "0; gemini_pretrain's own default is {:g}"  # the benchmark's decorrelation weights
ABLATIONS = {
    "gemini_weight": ("nnUNet_gemini_weight", "weight {:g}", USES_GEMINI_LOSS, "the GEMINI loss weight W", "1.0"),
    "gemini_rampup": ("nnUNet_gemini_rampup", "ramp-up {:g} of the run", USES_GEMINI_LOSS,
                      "sigmoid ramp-up of the GEMINI weight over the first share S of the run", "no ramp-up"),
    "gemini_pair_positions": ("nnUNet_gemini_pair_positions", "pairs at {} positions", USES_GEMINI_LOSS,
                              "the two patches of a pair at the same relative position of their cases (the "
                              "design) or at independent random positions", "same"),
    # the methods that load a pre-training load one run with gemini_pretrain --deformation of this model
    "gemini_deformation": ("nnUNet_gemini_deformation", "deformation {}", GEMINI_TRAINERS,
                           "the deformer's deformation model, and that of the pre-training the runs load",
                           "diffeomorphic"),
    # a pre-trained deformer sees what its pre-training's saw (--pretrain_deformer_input)
    "gemini_deformer_input": ("nnUNet_gemini_deformer_input", "deformer sees {}", FRESH_DEFORMER,
                              "what the fresh deformer sees of each image", "features, as released"),
    "gemini_deformer_lr": ("nnUNet_gemini_deformer_lr", "deformer lr {:g}", USES_GEMINI_LOSS,
                           "the deformer's own Adam learning rate", "1e-4, as released"),
    "gemini_lr": ("nnUNet_gemini_lr", "lr {:g}", GEMINI_TRAINERS, "the network's initial SGD learning rate",
                  "nnU-Net's 1e-2"),
    "gemini_warmup": ("nnUNet_gemini_warmup", "warm-up {:g} of the run", GEMINI_TRAINERS,
                      "linear warm-up of the network's learning rate over the first share S of the run", "none"),
    "gemini_transfer": ("nnUNet_gemini_transfer", "transfer {}", USES_PRETRAINING,
                        "what the pre-trained start loads: all but the segmentation layers, or the encoder only",
                        "all"),
    # a gemini_pretrain flag, not a trainer option: the call's pre-trainings run with it, under their own key
    "pretrain_decorrelation": ("--decorrelation", "pre-training decorrelation {:g}", USES_PRETRAINING,
                               "gemini_pretrain's weight W of the features' decorrelation term",
                               RELEASED_NOT_DEFAULT.format(PRETRAIN_DEFAULTS["decorrelation"])),
    "pretrain_encoder_decorrelation": ("--encoder_decorrelation", "pre-training encoder decorrelation {:g}",
                                       USES_PRETRAINING, "gemini_pretrain's weight W of the decorrelation term "
                                       "on the encoder stages",
                                       RELEASED_NOT_DEFAULT.format(PRETRAIN_DEFAULTS["encoder_decorrelation"])),
    "pretrain_restoration_weight": ("--restoration_weight", "pre-training restoration weight {:g}", USES_PRETRAINING,
                                    "gemini_pretrain's weight W of the restoration MSE", "100, as released"),
    "pretrain_lr": ("--lr", "pre-training lr {:g}", USES_PRETRAINING,
                    "gemini_pretrain's constant Adam learning rate (network and deformer)", "1e-4, as released"),
    "pretrain_deformer_lr": ("--deformer_lr", "pre-training deformer lr {:g}", USES_PRETRAINING,
                             "gemini_pretrain's Adam learning rate of the deformer alone", "the pre-training's lr"),
    "pretrain_deformer_input": ("--deformer_input", "pre-training deformer sees {}", USES_PRETRAINING,
                                "gemini_pretrain's deformer input (the runs that load it build theirs the same)",
                                "features, as released"),
    # pre-trainings of the same plans and seed start from the same network (and draw the same pairs and damage)
    "pretrain_seed": ("--seed", "pre-training seed {:g}", USES_PRETRAINING,
                      "gemini_pretrain's random seed N: the network's initialisation, the pairs, the damage",
                      f"{PRETRAIN_DEFAULTS['seed']}"),
    # a longer (or shorter) pre-training beside the budget's, which keeps its own checkpoint
    "pretrain_length": ("--epochs", "pre-training {:g} epochs", USES_PRETRAINING,
                        "gemini_pretrain's number of epochs E (of --pretrain_iters iterations each)",
                        "the budget's --pretrain_epochs"),
}
# the released pre-training's decorrelation weights, as this call's flags: a plain row's pre-training
RELEASED_PRETRAIN_FLAGS = {f"pretrain_{k}": v for k, v in RELEASED_DECORRELATION.items()}
PRETRAIN_ABLATIONS = {"pretrain_decorrelation", "pretrain_encoder_decorrelation", "pretrain_restoration_weight",
                      "pretrain_lr", "pretrain_deformer_lr", "pretrain_deformer_input", "pretrain_seed",
                      "pretrain_length"}
INTEGER_ABLATIONS = {"pretrain_length": "E", "pretrain_seed": "N"}  # -> metavar
CHOICE_ABLATIONS = {"gemini_pair_positions": PAIR_POSITIONS, "gemini_deformation": DEFORMATIONS,
                    "gemini_transfer": TRANSFERS, "gemini_deformer_input": DEFORMER_INPUTS,
                    "pretrain_deformer_input": DEFORMER_INPUTS}  # the others: numbers
DEMO_ID = 991
COLLECTION_FIRST_ID = 901  # --collection datasets: 901, 902, ... under -o (never the user's nnUNet_raw)
CONFIGURATION = "3d_fullres"
PLANS = "nnUNetPlans"
RESULTS_JSON, RESULTS_MD, RESULTS_PNG = "results.json", "results.md", "results.png"
ZERO_FIELD = "zero field (same pipeline)"  # registration record of a deformer whose field is 0
REPLACED_PLOT = ".progress_replaced.png"  # a finished pre-training's plot, set aside while a rerun draws its own


def budget_iterations(budget: dict) -> int:
    return budget["train_epochs"] * budget["train_iters"]


def _budget_help() -> str:
    return "; ".join(f"{name}: pre-train {b['pretrain_epochs']}x{b['pretrain_iters']} it, train "
                     f"{b['train_epochs']}x{b['train_iters']} = {budget_iterations(b)} supervised it, "
                     f"{b['val_iters']} val it/epoch, test-time mirroring {'on' if b['tta'] else 'off'}"
                     for name, b in BUDGETS.items())


def _machine(device: str) -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "device": device}
    if device == "cuda":
        import torch
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _label(run: dict) -> str:
    return run.get("label", run["method"])


def _run_key(run: dict) -> tuple:
    return _label(run), run["n"], run["draw"], run["iterations"], run.get("reference", False), run.get("repeat", 0)


def ablation_value_text(value) -> str:
    """An ablation value as names and command lines write it: a choice as is, a number in %g."""
    return value if isinstance(value, str) else format(value, "g")


def ablation_suffix(ablation: dict) -> str:
    """The folder and log-name suffix of an ablation's runs or pre-trainings, e.g. "_weight0.3_rampup0.1"."""
    return "".join(f"_{k.removeprefix('gemini_')}{ablation_value_text(v)}" for k, v in ablation.items())


def run_tag(method: str, ablation: dict, n: int, draw: int, iterations: int, reference: bool = False,
            repeat: int = 0) -> str:
    """The name of a run's stages and logs (train_TAG, predict_TAG, predict_TAG_selection); a
    reference run's, and a repeat's (--repeats), differ from the study's run of the same cell and length."""
    return (f"{method}{ablation_suffix(ablation)}_N{n}_draw{draw}_{iterations}it" + ("_reference" if reference else "")
            + (f"_repeat{repeat}" if repeat else ""))


def recorded_run_tag(run: dict) -> str:
    """The tag a recorded run's logs carry (recorded since reference runs got a tag of their own;
    older runs, references too, carry the plain one)."""
    return run.get("log_tag") or run_tag(run["method"], recorded_ablation(run), run["n"], run["draw"],
                                         run["iterations"])


def pretrain_stage(deformation: str, dataset_name: str, collection_mode: bool, pretrain_ablation: dict) -> str:
    """The name of a pre-training's stage and log; an ablation's is its folder's name."""
    if pretrain_ablation:
        return f"pretrain_{deformation}{ablation_suffix(pretrain_ablation)}_{dataset_name}"
    return f"pretrain_{deformation}" + (f"_{dataset_name}" if collection_mode else "")


def attempt_suffix(attempt: int) -> str:
    """What a rerun of a recorded pre-training (its checkpoint lost) adds to its log's and plot's
    names, so that the attempt it replaces keeps its own."""
    return f"_attempt{attempt}" if attempt else ""


def pretrain_folder(deformation: str, dataset_name: str, collection_mode: bool, pretrain_ablation: dict,
                    results_root: str, out: str) -> str:
    """The folder of a pre-training's checkpoint: the standard one's where the trainers look for it
    (under results_root); an ablation's (linked where its trainers look) or a displacement one's is
    its stage folder under out."""
    if deformation == "diffeomorphic" and not pretrain_ablation:
        from nnunet_gemini.pretrained import pretrain_output_dir
        return pretrain_output_dir(dataset_name, PLANS, CONFIGURATION, results_root)
    return os.path.join(out, pretrain_stage(deformation, dataset_name, collection_mode, pretrain_ablation))


def results_root_name(reference: bool, ablation: dict, iterations: Optional[int] = None, repeat: int = 0) -> str:
    """The nnUNet_results folder of a run, named as under OUT (a plain run's is the study's own,
    which lies under OUT in collection mode): a reference or ablation run must not replace the
    budget run of its fold, nor a run of another length (iterations given: "..._1250it") one of this,
    nor a repeat (repeat r > 0: "..._repeatR") the first run of its cell."""
    root = ("nnUNet_results_reference" if reference else
            f"nnUNet_results_ablation{ablation_suffix(ablation)}" if ablation else "nnUNet_results")
    return root + (f"_{iterations}it" if iterations else "") + (f"_repeat{repeat}" if repeat else "")


def recorded_ablation(record: dict, flags=ABLATIONS) -> dict:
    """The ablation flags (of `flags`) a recorded run or pre-training ran with, in ABLATIONS' order
    (the order of the names and folders they build)."""
    return {k: record[k] for k in ABLATIONS if k in flags and k in record}


def run_results_root(run: dict) -> str:
    """The results root a recorded run trained in (recorded since runs of several lengths share a
    study; before that, every run's was its method's)."""
    return run.get("results_root") or results_root_name(run["reference"], recorded_ablation(run))


def run_folder(results_dir, dataset: str, trainer: str, fold) -> Path:
    """nnU-Net's output folder of one training: RESULTS/DATASET/TRAINER__PLANS__CONFIGURATION/fold_F."""
    return Path(results_dir) / dataset / f"{trainer}__{PLANS}__{CONFIGURATION}" / f"fold_{fold}"


def training_logs_in(folder: Path) -> set:
    return {p.name for p in Path(folder).glob("training_log_*.txt")}


def pretraining_attempts(results: dict) -> list:
    """(key, record) of every pre-training results.json records: the current attempt of each key
    and those a rerun replaced (pretraining_replaced)."""
    return [*results.get("pretraining", {}).items(),
            *((r["key"], r) for r in results.get("pretraining_replaced", []))]


def finished_outputs(results: dict) -> tuple:
    """(log names in OUT/logs, {folder relative to OUT: the training logs in it to publish, or None
    for all}) of the runs and pre-trainings that results.json records as finished: what a study may
    publish. A stage killed mid-way leaves a log and a folder without a result; a run retried after
    such a kill shares its folder with the killed attempt's training log, so a run records the logs
    its own training wrote (runs recorded before that carry None)."""
    collection_mode = "collection" in results
    logs, folders = set(), {}

    def add_folder(folder: str, record: dict) -> None:
        # the training logs the record names (None, all, for records from before they named them); two
        # records of one folder (an older study's runs of two lengths, a pre-training and its rerun): both
        own = set(record["training_logs"]) if "training_logs" in record else None
        seen = folders.get(folder, set())
        folders[folder] = None if own is None or seen is None else seen | own

    for run in results["runs"]:
        tag = recorded_run_tag(run)
        logs |= {f"train_{tag}.log", f"predict_{tag}.log"} | ({f"predict_{tag}_selection.log"} if "selection" in run
                                                               else set())
        add_folder(str(run_folder(run_results_root(run), run["dataset"], run["trainer"], run["fold"])), run)
    for _, record in pretraining_attempts(results):
        ablation = recorded_ablation(record, PRETRAIN_ABLATIONS)
        stage = pretrain_stage(record["deformation"], record["dataset"], collection_mode, ablation)
        logs.add(f"{stage}{attempt_suffix(record.get('attempt', 0))}.log")
        # a pre-training names the logs in its folder when it finished (a resumed run's are all its own),
        # not those of a rerun still going in the same folder
        add_folder(pretrain_folder(record["deformation"], record["dataset"], collection_mode, ablation,
                                   "nnUNet_results", ""), record)
    return logs, folders


def method_label(method: str, **ablation) -> str:
    """The name a run is reported and resumed under: the method, with the ablations that apply to
    it in ABLATIONS order, e.g. "nnUNetTrainerGEMINI (weight 0.3, ramp-up 0.1 of the run)"."""
    parts = [ABLATIONS[k][1].format(ablation[k]) for k in ABLATIONS
             if ablation.get(k) is not None and method in ABLATIONS[k][2]]
    return f"{method} ({', '.join(parts)})" if parts else method


def training_n_proc_da(device: str, jobs: int, user_value: Optional[str],
                       cpu_count: Optional[int] = None) -> Optional[str]:
    """nnUNet_n_proc_DA for pre-training and training runs (None: nnU-Net's own default). CPU: 0
    (augmentation in the training process, as the test and CPU notes advise); else the user's
    value; else, with --jobs K > 1, the cores shared out so K trainings do not oversubscribe them."""
    if device == "cpu":
        return "0"
    if user_value is not None and user_value.strip():
        return user_value.strip()
    if jobs > 1:
        return str(max(1, (cpu_count or os.cpu_count() or 1) // jobs - 1))
    return None


def registered_deformations(registration: Optional[str], collection_mode: bool, used: str) -> tuple:
    """The deformation models whose pre-trained deformer's registration a call records (--registration):
    by default both on -d, and with --collection only the one the runs load (`used`)."""
    registration = registration or (used if collection_mode else "both")
    return {"both": DEFORMATIONS, "none": ()}.get(registration, (registration,))


class Benchmark:
    def __init__(self, args, out_dir: Path, folders: dict):
        self.a, self.out, self.folders = args, out_dir, folders
        self.budget = dict(BUDGETS[args.budget], **{k: v for k, v in vars(args).items()
                                                     if k in BUDGETS[args.budget] and v is not None})
        self.device = args.device or default_device()
        env = dict(os.environ, **folders)
        env.setdefault("nnUNet_def_n_proc", "1" if self.device == "cpu" else str(min(8, os.cpu_count() or 1)))
        # set only for training (planning in 2.8.1 crashes on 0); the user's own value is kept for that
        user_da = env.pop("nnUNet_n_proc_DA", None)
        self.jobs = getattr(args, "jobs", 1)
        self.repeats = getattr(args, "repeats", 1)
        self.n_proc_da = training_n_proc_da(self.device, self.jobs, user_da)
        self.n_proc_da_pretrain = training_n_proc_da(self.device, 1, user_da)  # it runs alone
        for k, (var, *_) in ABLATIONS.items():
            if k not in PRETRAIN_ABLATIONS:
                env.pop(var, None)  # only the flags set them, so a run's label always says what it trained with
        self.ablation = {k: getattr(args, k, None) for k in ABLATIONS}
        # gemini_pretrain flags of this call's pre-trainings (an ablation: their own key, folder and rows)
        self.pretrain_ablation = {k: v for k, v in self.ablation.items() if k in PRETRAIN_ABLATIONS and v is not None}
        self.deformation = self.ablation["gemini_deformation"] or "diffeomorphic"  # of the pre-training runs load
        self.collection_mode = getattr(args, "collection", None) is not None
        self.env = env
        (out_dir / "logs").mkdir(parents=True, exist_ok=True)
        self.run = StageRunner(env, out_dir / "logs", "gemini_benchmark")
        self._lock = threading.Lock()  # --jobs > 1: runs append to results.json from several threads
        self.results_path = out_dir / RESULTS_JSON
        self.results: dict = {}
        self.cells: Dict[tuple, dict] = {}  # (N, draw) -> dataset id/name/raw folder, fold, train cases, pre-training
        self.revision = project_revision()

    # ------------------------------------------------------------------ bookkeeping
    def _load_results(self, config: dict) -> dict:
        config = dict(config, configuration=CONFIGURATION, plans=PLANS)
        if self.results_path.is_file():
            results = json.loads(self.results_path.read_text())
            if results.get("config") != config:
                raise GeminiUserError(f"{self.results_path} belongs to another study ({results.get('config')}, now "
                                      f"{config}): choose another -o or delete that folder")
            return results
        return {"format_version": 1, "config": config, "runs": [], "pretraining": {}, "registration": {}}

    def _save(self) -> None:
        write_json_atomic(str(self.results_path), self.results)

    def _finished(self, key: tuple) -> Optional[dict]:
        return next((r for r in self.results["runs"] if _run_key(r) == key), None)

    def _same_training(self, key: tuple) -> Optional[dict]:
        """A stock nnUNetTrainer run and its --reference_iters twin (same cell, same length) are one
        training: when either is finished the other is recorded from it, marked, with no time of its own."""
        label, n, draw, iterations, reference, repeat = key
        source = (self._finished((label, n, draw, iterations, not reference, repeat)) if label == "nnUNetTrainer"
                  else None)
        if source is None:
            return None
        twin = dict(source, reference=reference, results_root=run_results_root(source),
                    log_tag=recorded_run_tag(source), same_run_as=recorded_run_tag(source),
                    train_seconds=0.0, predict_seconds=0.0, wall_seconds=0.0,
                    finished=time.strftime("%Y-%m-%d %H:%M:%S"))
        with self._lock:
            self.results["runs"].append(twin)
            self._save()
        print(f"[gemini_benchmark] {label} N={n} draw={draw} ({iterations} it): the same training as "
              f"{twin['same_run_as']}, recorded again", flush=True)
        return twin

    # ------------------------------------------------------------------ datasets
    def _plan(self, dataset_name: str) -> dict:
        """The dataset's plans, planned and preprocessed by nnU-Net's own planner when not yet."""
        from nnunet_gemini.datasets import is_preprocessed, load_json
        pre = Path(self.folders["nnUNet_preprocessed"]) / dataset_name
        plans_file = pre / f"{PLANS}.json"
        if not plans_file.is_file() or not is_preprocessed(str(pre), load_json(str(plans_file)), CONFIGURATION):
            self.run(f"plan_and_preprocess_{dataset_name}",
                     ["nnUNetv2_plan_and_preprocess", "-d", str(dataset_id_of(dataset_name)), "-c", CONFIGURATION,
                      "-np", self.env["nnUNet_def_n_proc"], "-npfp", self.env["nnUNet_def_n_proc"],
                      "--verify_dataset_integrity"])
        return load_json(str(plans_file))

    def prepare_dataset(self) -> None:
        from nnunet_gemini.datasets import load_json, resolve_dataset
        os.environ.update(self.folders)  # nnunet_gemini.datasets reads the variables at call time
        self.results = self._load_results({"dataset_arg": self.a.d, "seed": self.a.seed})
        dataset = self.a.d
        if dataset is None:
            dataset = str(self.a.demo_id)
            if not any(d.startswith(f"Dataset{self.a.demo_id:03d}_") for d in os.listdir(self.folders["nnUNet_raw"])):
                self.run("demo_dataset", ["gemini_demo_dataset", "-d", dataset])
        name = resolve_dataset(dataset)
        raw = Path(self.folders["nnUNet_raw"]) / name
        for sub in ("imagesTs", "labelsTs"):
            if not (raw / sub).is_dir():
                raise GeminiUserError(f"{raw / sub} does not exist: the benchmark scores held-out test cases; "
                                      f"add imagesTs/ and labelsTs/ to the raw dataset")
        self.dataset_json = load_json(str(raw / "dataset.json"))
        self._plan(name)
        self.run("fewshot_split", ["gemini_fewshot_split", "-d", str(dataset_id_of(name)), "-n", *map(str, self.a.n),
                                   "--draws", str(self.a.draws), "--seed", str(self.a.seed), "--overwrite"])
        mapping = load_json(str(Path(self.folders["nnUNet_preprocessed"]) / name / "splits_fewshot.json"))
        for f in mapping["folds"]:
            self.cells[(f["n"], f["draw"])] = dict(dataset_name=name, raw=raw, fold=f["fold"], train=f["train"],
                                                   pretrain_dataset=name)
        self.registration_set = (raw / "imagesTs", raw / "labelsTs", "ordered test pairs")
        self.results["dataset"] = name

    def prepare_collection(self) -> None:
        """Reads and checks the whole collection, draws the split, and builds and plans the raw
        dataset of every (N, draw) of this call (kept when already built). Datasets whose plans
        agree (plans_signature) share one pre-training: the first of them in (N, draw) order runs it."""
        from nnunet_gemini import collection
        from nnunet_gemini.datasets import dataset_prefix
        os.environ.update(self.folders)
        a = self.a
        coll = collection.read_collection(a.collection, a.channel_name)
        manifest = collection.file_manifest(coll)
        self.results = self._load_results({
            "collection_sha256": collection.json_digest(manifest), "split_seed": a.split_seed,
            "test_cases": a.test_cases, "pool_cases": a.pool_cases, "selection_cases": a.selection_cases,
            "channel_names": coll.channel_names})
        split = collection.draw_split(coll.case_ids, a.test_cases, a.pool_cases, a.selection_cases, a.n, a.draws,
                                      a.split_seed)
        labels = collection.check_collection(coll)  # every case, so the label names never depend on the call
        self.dataset_json = {"labels": labels, "file_ending": coll.file_ending}
        self.results["collection"] = {
            "root": coll.root, "form": coll.form, "num_cases": len(coll.case_ids), "labels": labels,
            "files": manifest, **{k: split[k] for k in ("test", "pool", "selection", "labelled_candidates")}}
        built = self.results.setdefault("datasets", {})
        groups = self.results.setdefault("pretraining_groups", {})  # plans signature digest -> dataset that pre-trains
        for d in split["draws"]:
            key = f"N{d['n']}_draw{d['draw']}"
            if key not in built:
                taken = {r["id"] for r in built.values()}
                did = next(i for i in range(COLLECTION_FIRST_ID, 1000) if i not in taken)
                built[key] = {"id": did, "name": f"{dataset_prefix(did)}GeminiStudyN{d['n']}draw{d['draw']}",
                              "train": d["train"]}
            record = built[key]
            if record["train"] != d["train"]:
                raise GeminiUserError(f"{self.results_path}: {key} was built from {record['train']}, the split now "
                                      f"draws {d['train']}: choose another -o or delete that folder")
            raw = self._build_and_plan(coll, labels, split, record)
            groups.setdefault(record["plans_signature"], record["name"])
            self.cells[(d["n"], d["draw"])] = dict(dataset_name=record["name"], raw=raw, fold="all",
                                                   train=d["train"], pretrain_dataset=groups[record["plans_signature"]])
        # a group's pre-training runs on the dataset an earlier call recorded for it, which this
        # call may not draw (another --n) and a lost scratch folder may no longer hold
        by_name = {r["name"]: r for r in built.values()}
        drawn = {c["dataset_name"] for c in self.cells.values()}  # built and planned above
        for anchor in sorted({c["pretrain_dataset"] for c in self.cells.values()} - drawn):
            self._build_and_plan(coll, labels, split, by_name[anchor])
        self._save()
        first = next(iter(self.cells.values()))["raw"]
        self.registration_set = (first / collection.SELECTION_IMAGES, first / collection.SELECTION_LABELS,
                                 "ordered selection-set pairs")
        self.results["dataset"] = f"collection {coll.root} ({len(coll.case_ids)} cases, split seed {a.split_seed})"

    def _build_and_plan(self, coll, labels: dict, split: dict, record: dict) -> Path:
        """The raw dataset of one datasets record, built (when not yet) and planned; records its
        plans signature. Returns its raw folder."""
        from nnunet_gemini import collection
        from nnunet_gemini.datasets import dataset_prefix
        raw = Path(self.folders["nnUNet_raw"]) / record["name"]
        if not (raw / "dataset.json").is_file():  # written last: its absence means not (completely) built
            collection.build_dataset(coll, labels, split, record["train"], self.folders["nnUNet_raw"], record["id"],
                                     record["name"][len(dataset_prefix(record["id"])):])
        signature = collection.plans_signature(self._plan(record["name"]), CONFIGURATION)
        record["plans_signature"] = collection.json_digest(signature)[:16]
        return raw

    # ------------------------------------------------------------------ stages
    def pretrain_flags(self, repeat: int = 0) -> dict:
        """The gemini_pretrain flags (PRETRAIN_ABLATIONS) of the pre-training that a run of this repeat
        loads: this call's; repeat r > 0 (--repeats) seeds it r above this call's seed, so that every
        repeat of a pre-trained method starts from an initialisation (and pairs, damage) of its own,
        as every nnUNetTrainer run does."""
        if not repeat:
            return self.pretrain_ablation
        flags = dict(self.pretrain_ablation,
                     pretrain_seed=self.pretrain_ablation.get("pretrain_seed", PRETRAIN_DEFAULTS["seed"]) + repeat)
        return {k: flags[k] for k in ABLATIONS if k in flags}  # ABLATIONS' order: the names they build

    def _pretraining_key(self, deformation: str, dataset_name: str, repeat: int = 0) -> str:
        key = deformation if not self.collection_mode else f"{deformation}:{dataset_name}"
        parts = [ABLATIONS[k][1].format(v) for k, v in self.pretrain_flags(repeat).items()]
        return key + (f" ({', '.join(parts)})" if parts else "")

    @property
    def pretrain_epochs(self) -> int:
        """Of this call's pre-trainings: the budget's, unless --pretrain_length sets them."""
        return self.pretrain_ablation.get("pretrain_length", self.budget["pretrain_epochs"])

    @property
    def pretrain_iterations(self) -> int:
        return self.pretrain_epochs * self.budget["pretrain_iters"]

    def _pretrain_checkpoint(self, deformation: str, dataset_name: str, repeat: int = 0) -> Path:
        from nnunet_gemini.pretrained import FINAL_CHECKPOINT
        return Path(pretrain_folder(deformation, dataset_name, self.collection_mode, self.pretrain_flags(repeat),
                                    self.folders["nnUNet_results"], str(self.out)), FINAL_CHECKPOINT)

    def pretrain(self, deformation: str, dataset_name: str, repeat: int = 0) -> dict:
        """One gemini_pretrain run on `dataset_name` (recorded; reused by a later call). Run again
        (its checkpoint lost, or another budget), it is a new attempt: the record it replaces moves,
        with its registration record, to results.json's pretraining_replaced, where the runs that
        loaded it keep finding it; the new attempt's log and progress plot get names of their own.
        A killed run, or a longer --pretrain_length, goes on from a checkpoint (_continue_pretraining).
        `repeat`: the pre-training a repeat's runs load (pretrain_flags)."""
        key = self._pretraining_key(deformation, dataset_name, repeat)
        pretrain_flags = self.pretrain_flags(repeat)
        record = self.results["pretraining"].get(key)
        iterations = self.pretrain_iterations
        checkpoint = self._pretrain_checkpoint(deformation, dataset_name, repeat)
        if record and record["iterations"] == iterations and checkpoint.is_file():
            return record
        attempt = record.get("attempt", 0) + 1 if record else 0
        continued = self._continue_pretraining(deformation, dataset_name, checkpoint, pretrain_flags)
        cmd = ["gemini_pretrain", "-d", str(dataset_id_of(dataset_name)), "-c", CONFIGURATION, "-p", PLANS,
               "-device", self.device, "--epochs", str(self.pretrain_epochs),
               "--iters_per_epoch", str(self.budget["pretrain_iters"]), "--deformation", deformation]
        cmd += ["--c"] if continued else []
        # the released decorrelation weights unless this call sets them, so a study's plain rows mean the
        # released pre-training whatever gemini_pretrain's defaults (ours decorrelate); --pretrain_length is
        # the --epochs above, not a flag of its own
        flags = {**RELEASED_PRETRAIN_FLAGS, **pretrain_flags}
        cmd += [arg for k, v in flags.items() if k != "pretrain_length"
                for arg in (ABLATIONS[k][0], ablation_value_text(v))]
        if deformation != "diffeomorphic" or pretrain_flags:
            cmd += ["-o", str(checkpoint.parent)]
        stage = pretrain_stage(deformation, dataset_name, self.collection_mode, pretrain_flags)
        plot = checkpoint.parent / "progress.png"  # gemini_pretrain redraws it every epoch
        replaced_plot = plot.with_name(REPLACED_PLOT)
        if attempt and plot.is_file():
            plot.replace(replaced_plot)
        try:
            seconds = self.run(stage + attempt_suffix(attempt), cmd,
                               extra_env={"nnUNet_n_proc_DA": self.n_proc_da_pretrain}
                               if self.n_proc_da_pretrain is not None else None)
            if attempt and plot.is_file():
                plot.replace(plot.with_name(f"progress{attempt_suffix(attempt)}.png"))
        finally:
            if replaced_plot.is_file():
                replaced_plot.replace(plot)
        if record:
            replaced = dict(record, key=key, replaced=time.strftime("%Y-%m-%d %H:%M:%S"))
            if key in self.results["registration"]:  # measured on the deformer this run replaced
                replaced["registration"] = self.results["registration"].pop(key)
            self.results.setdefault("pretraining_replaced", []).append(replaced)
        record = {"deformation": deformation, "dataset": dataset_name, "checkpoint": str(checkpoint),
                  "iterations": iterations, "seconds": round(seconds + continued.get("resumed_seconds", 0.0), 1),
                  "device": self.device, "revision": self.revision,
                  "training_logs": sorted(training_logs_in(checkpoint.parent)),
                  **pretrain_flags, **({"attempt": attempt} if attempt else {}), **continued}
        self.results["pretraining"][key] = record
        self._save()
        return record

    def _continue_pretraining(self, deformation: str, dataset_name: str, checkpoint: Path,
                              pretrain_flags: dict) -> dict:
        """Where this pre-training goes on from with gemini_pretrain --c ({} for a fresh start): the
        checkpoint_latest.pth an interrupted run left in its folder, else, for --pretrain_length, the
        longest finished pre-training with the same flags and fewer iterations (copied in). Adam's lr
        is constant, so a continued run keeps an uninterrupted run's schedule (its loader draws differ
        after the resume point). A checkpoint cut into other epochs, or past this length, is not used.
        resumed_seconds: the epoch times the checkpoint logged, so the record's seconds are those of
        the whole pre-training however many calls it took."""
        from nnunet_gemini.checkpoints import KIND_PRETRAIN, load_our_checkpoint
        from nnunet_gemini.pretrained import LATEST_CHECKPOINT
        latest, per_epoch = checkpoint.with_name(LATEST_CHECKPOINT), self.budget["pretrain_iters"]
        source = None
        if not latest.is_file():
            if "pretrain_length" not in pretrain_flags:
                return {}
            flags = {k: pretrain_flags.get(k) for k in PRETRAIN_ABLATIONS - {"pretrain_length"}}
            shorter = [(r["iterations"], key) for key, r in self.results["pretraining"].items()
                       if r["deformation"] == deformation and r.get("dataset") == dataset_name
                       and {k: r.get(k) for k in flags} == flags and r["iterations"] < self.pretrain_iterations
                       and Path(r["checkpoint"]).is_file()]
            if not shorter:
                return {}
            source = max(shorter)[1]
            latest.parent.mkdir(parents=True, exist_ok=True)
            # a copy, not a link: the continued run rewrites checkpoint_latest.pth
            shutil.copy2(self.results["pretraining"][source]["checkpoint"], latest)
        try:
            ckpt = load_our_checkpoint(str(latest), KIND_PRETRAIN)
        except GeminiUserError:
            return {}  # unreadable: gemini_pretrain starts again and overwrites it
        done = int(ckpt["iteration"])
        if done != int(ckpt["epoch"]) * per_epoch or done > self.pretrain_iterations:
            return {}
        times = ckpt.get("logging", {}).get("epochs", {}).get("epoch_time_s", [])
        return {"resumed_from_iteration": done, "resumed_seconds": round(float(sum(times)), 1),
                **({"continued_from": source} if source else {})}

    def _link_pretraining(self, results_root: str, cell: dict, repeat: int = 0) -> None:
        """Make the cell's shared pre-training (the one of this repeat) visible where its trainer looks
        for one: under results_root for the cell's dataset (a link to the checkpoint of the dataset that ran it)."""
        from nnunet_gemini.pretrained import FINAL_CHECKPOINT, pretrain_output_dir
        shared = self._pretrain_checkpoint(self.deformation, cell["pretrain_dataset"], repeat)
        link = Path(pretrain_output_dir(cell["dataset_name"], PLANS, CONFIGURATION, results_root), FINAL_CHECKPOINT)
        if link == shared:
            return
        link.parent.mkdir(parents=True, exist_ok=True)
        try:
            link.symlink_to(shared)
        except FileExistsError:  # an earlier run (or another --jobs thread) made it
            pass

    def preprocess_pools(self, runs: List[dict]) -> None:
        """Every unlabelled pool a training of this call uses, built before any training starts:
        with --jobs two trainings of one dataset would otherwise both build it at first use."""
        from nnunet_gemini.unlabeled import MANIFEST_NAME, pool_folder_for
        names = sorted({self.cells[(r["n"], r["draw"])]["dataset_name"] for r in runs
                        if r["method"] in USES_GEMINI_LOSS})
        for name in names:
            if not os.path.isfile(os.path.join(pool_folder_for(name, PLANS, CONFIGURATION), MANIFEST_NAME)):
                self.run(f"pool_{name}", ["gemini_pretrain", "-d", str(dataset_id_of(name)), "-c", CONFIGURATION,
                                          "-p", PLANS, "--preprocess_only"])

    def _predict_and_score(self, tag: str, cell: dict, trainer: str, results_dir: str, images: str,
                           labels: str) -> tuple:
        pred_dir = self.out / "predictions" / tag
        if pred_dir.exists():
            shutil.rmtree(pred_dir)  # leftovers of an interrupted call
        predict = ["nnUNetv2_predict", "-i", str(cell["raw"] / images), "-o", str(pred_dir), "-d",
                   str(dataset_id_of(cell["dataset_name"])), "-c", CONFIGURATION, "-p", PLANS, "-f", str(cell["fold"]),
                   "-tr", trainer, "-device", self.device, "-npp", "1", "-nps", "1"] + \
            ([] if self.budget["tta"] else ["--disable_tta"])
        seconds = self.run(f"predict_{tag}", predict, extra_env={"nnUNet_results": results_dir})
        scores = score_predictions(str(cell["raw"] / labels), str(pred_dir), self.dataset_json["labels"],
                                   str(pred_dir / "summary.json"))
        return scores, seconds

    def run_key(self, method: str, n: int, draw: int, epochs: int, reference: bool = False, repeat: int = 0) -> tuple:
        """The key results.json's record of this run would have (see _run_key)."""
        return self.ablation_of(method)[1], n, draw, epochs * self.budget["train_iters"], reference, repeat

    def train_and_score(self, method: str, n: int, draw: int, epochs: int, reference: bool = False,
                        repeat: int = 0) -> dict:
        ablation, label = self.ablation_of(method)
        key = self.run_key(method, n, draw, epochs, reference, repeat)
        iterations = key[3]
        of_repeat = f", repeat {repeat}" if repeat else ""
        done = self._finished(key)
        if done is not None:
            print(f"[gemini_benchmark] done already: {label} N={n} draw={draw}{of_repeat} ({iterations} it)",
                  flush=True)
            return done
        done = self._same_training(key)
        if done is not None:
            return done
        cell = self.cells[(n, draw)]
        trainer = TRAINER_OF.get(method, method)
        tag = run_tag(method, ablation, n, draw, iterations, reference, repeat)
        results_root = self._results_root(trainer, ablation, reference, cell, iterations, repeat)
        results_dir = (self.folders["nnUNet_results"] if results_root == "nnUNet_results" else
                       str(self.out / results_root))
        pretraining_key = self._pretraining_key(self.deformation, cell["pretrain_dataset"], repeat)
        if method in USES_PRETRAINING:
            self._link_pretraining(results_dir, cell, repeat)
        env = {"nnUNet_results": results_dir, "nnUNet_gemini_num_epochs": str(epochs),
               "nnUNet_gemini_iters_per_epoch": str(self.budget["train_iters"]),
               "nnUNet_gemini_val_iters": str(self.budget["val_iters"]),
               "nnUNet_gemini_final_validation": "0",  # scored on imagesTs: nnU-Net's validation is time for nothing
               **{ABLATIONS[k][0]: str(v) for k, v in ablation.items() if k not in PRETRAIN_ABLATIONS}}
        if self.n_proc_da is not None:
            env["nnUNet_n_proc_DA"] = self.n_proc_da
        folder = run_folder(results_dir, cell["dataset_name"], trainer, cell["fold"])
        earlier_logs = training_logs_in(folder)  # of a killed attempt at this run, if any
        train_s = self.run(f"train_{tag}", ["nnUNetv2_train", str(dataset_id_of(cell["dataset_name"])), CONFIGURATION,
                                            str(cell["fold"]), "-tr", trainer, "-p", PLANS, "-device", self.device],
                           extra_env=env)
        training_logs = sorted(training_logs_in(folder) - earlier_logs)
        scores, predict_s = self._predict_and_score(tag, cell, trainer, results_dir, "imagesTs", "labelsTs")
        run = {"method": method, "label": label, **ablation, "trainer": trainer, "n": n, "draw": draw,
               "repeat": repeat, "dataset": cell["dataset_name"], "fold": cell["fold"], "reference": reference,
               "train_cases": cell["train"], "results_root": results_root, "iterations": iterations, "epochs": epochs,
               "iters_per_epoch": self.budget["train_iters"], **scores, "training_logs": training_logs, "log_tag": tag,
               "train_seconds": train_s, "predict_seconds": predict_s, "pretrain_share_seconds": 0.0,
               "wall_seconds": round(train_s + predict_s, 1), "device": self.device, "revision": self.revision,
               "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        if self.collection_mode:  # the set options are chosen on; its prediction is not part of the wall time
            from nnunet_gemini.collection import SELECTION_IMAGES, SELECTION_LABELS
            selection, _ = self._predict_and_score(f"{tag}_selection", cell, trainer, results_dir, SELECTION_IMAGES,
                                                   SELECTION_LABELS)
            run["selection"] = selection
        if method in USES_PRETRAINING:  # its share is set by share_pretraining once all runs are known
            loaded = self.results["pretraining"][pretraining_key]
            run["pretraining"] = pretraining_key
            run["pretrain_iterations"] = loaded["iterations"]
            run["pretraining_attempt"] = loaded.get("attempt", 0)
        with self._lock:
            self.results["runs"].append(run)
            self._save()
        print(f"[gemini_benchmark] {label} N={n} draw={draw}{of_repeat}: mean Dice {run['dice_mean']:.4f}", flush=True)
        return run

    def _results_root(self, trainer: str, ablation: dict, reference: bool, cell: dict, iterations: int,
                      repeat: int = 0) -> str:
        """The run's method's (and repeat's) results root, or one of its own length when a finished run
        of another length trained in that folder (a longer budget on the same -o would overwrite its model)."""
        root = results_root_name(reference, ablation, repeat=repeat)
        folder = run_folder(root, cell["dataset_name"], trainer, cell["fold"])
        if any(run_folder(run_results_root(r), r["dataset"], r["trainer"], r["fold"]) == folder
               and r["iterations"] != iterations for r in self.results["runs"]):
            return results_root_name(reference, ablation, iterations, repeat)
        return root

    def ablation_of(self, method: str):
        """({flag: value} of this call's ablation flags that apply to `method`, the label it runs under)."""
        ablation = {k: v for k, v in self.ablation.items() if v is not None and method in ABLATIONS[k][2]}
        return ablation, method_label(method, **ablation)

    def registration_recorded(self, deformation: str, dataset_name: str) -> bool:
        """Whether results.json holds the registration record of this pre-training at this budget."""
        key = self._pretraining_key(deformation, dataset_name)
        done, record = self.results["registration"].get(key), self.results["pretraining"].get(key)
        iterations = self.pretrain_iterations
        return bool(done and record and done.get("pretrain_iterations") == record["iterations"] == iterations)

    def registration(self, deformation: str, dataset_name: str) -> dict:
        key = self._pretraining_key(deformation, dataset_name)
        if self.registration_recorded(deformation, dataset_name):
            return self.results["registration"][key]
        record = self.results["pretraining"][key]
        from nnunet_gemini.register import load_from_pretrain_checkpoint, register_folder
        images, labels, what = self.registration_set
        print(f"[gemini_benchmark] registration quality ({key}) on {what}", flush=True)
        t0 = time.time()
        model = load_from_pretrain_checkpoint(record["checkpoint"], self.device)
        summary = register_folder(model, str(images), str(labels), str(self.out / "registration" / key),
                                  write_images=False)
        dice = [p["dice"]["mean"] for p in summary["pairs"]]
        folding = [p["folding_fraction"] for p in summary["pairs"]]
        out = {"deformation": deformation, "pretrain_iterations": record["iterations"], "pairs": len(dice),
               "pairs_of": what, "dice_mean": float(np.nanmean(dice)), "dice_std": float(np.nanstd(dice)),
               "dice_per_structure": summary["mean_dice_per_structure"],
               "folding_fraction_mean": float(np.mean(folding)), "folding_fraction_max": float(np.max(folding)),
               "seconds": round(time.time() - t0, 1), "per_pair": summary["pairs"]}
        self.results["registration"][key] = out
        self._save()
        if ZERO_FIELD not in self.results["registration"]:
            self.zero_field_dice(model, images, labels, what)
        return out

    def zero_field_dice(self, model, images: Path, labels: Path, what: str) -> dict:
        """The deformer's own contribution's floor: the same registration pipeline (nnU-Net's
        preprocessing of both images, the moving one resampled onto the fixed grid by relative
        position) with a zero field. "unregistered" compares the labels in physical space instead;
        on crops of different extent the two differ, so both are reported."""
        import torch

        from nnunet_gemini.register import register_folder
        out_layer = model.step.deformer.out
        kept = out_layer.weight.detach().clone(), out_layer.bias.detach().clone()
        with torch.no_grad():
            out_layer.weight.zero_()  # the field is 0 everywhere: displacement 0, exp(0) = identity
            out_layer.bias.zero_()
        try:
            summary = register_folder(model, str(images), str(labels), None, write_images=False)
        finally:  # the caller's model comes back as it was given
            with torch.no_grad():
                out_layer.weight.copy_(kept[0])
                out_layer.bias.copy_(kept[1])
        dice = [p["dice"]["mean"] for p in summary["pairs"]]
        out = {"pairs": len(dice), "pairs_of": what, "dice_mean": float(np.nanmean(dice)),
               "dice_std": float(np.nanstd(dice)), "per_pair": summary["pairs"]}
        self.results["registration"][ZERO_FIELD] = out
        self._save()
        return out

    def unregistered_dice(self) -> dict:
        """Warped-label Dice's floor: the labels of each ordered pair of the registration set compared as they are."""
        if "unregistered" in self.results["registration"]:
            return self.results["registration"]["unregistered"]
        import SimpleITK as sitk

        from nnunet_gemini.register import label_dice
        _, labels_dir, what = self.registration_set
        ending = self.dataset_json["file_ending"]
        files = sorted(f for f in os.listdir(labels_dir) if f.endswith(ending))
        images = {f: sitk.ReadImage(str(labels_dir / f)) for f in files}
        dice = []
        for m in files:
            for f in files:
                if m != f:
                    moved = sitk.Resample(images[m], images[f], sitk.Transform(), sitk.sitkNearestNeighbor)
                    dice.append(label_dice(sitk.GetArrayFromImage(moved), sitk.GetArrayFromImage(images[f]),
                                           self.dataset_json["labels"])["mean"])
        out = {"pairs": len(dice), "pairs_of": what, "dice_mean": float(np.nanmean(dice)),
               "dice_std": float(np.nanstd(dice))}
        self.results["registration"]["unregistered"] = out
        self._save()
        return out

    def train_all(self, runs: List[dict]) -> None:
        """Every run, one after another, or --jobs at a time (a GPU that one small training leaves
        mostly idle); every run that finishes is recorded even when another one fails."""
        if self.jobs == 1:
            for run in runs:
                self.train_and_score(**run)
            return
        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            futures = [pool.submit(self.train_and_score, **run) for run in runs]
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            raise errors[0]

    # ------------------------------------------------------------------ the study
    def execute(self) -> None:
        t_start = time.time()
        self.prepare_collection() if self.collection_mode else self.prepare_dataset()
        methods, ns, draws = self.a.methods, self.a.n, range(self.a.draws)
        changed = {k: v for k, v in self.budget.items() if BUDGETS[self.a.budget][k] != v}
        label = self.a.budget + "".join(f", {k}={v}" for k, v in changed.items())
        self.results.update(budget=label, budget_iterations=dict(self.budget), device=self.device,
                            machine=_machine(self.device), command=["gemini_benchmark"] + list(self.argv))
        self._save()
        deformations = registered_deformations(self.a.registration, self.collection_mode, self.deformation)
        runs = [dict(method=method, n=n, draw=draw, epochs=self.budget["train_epochs"], repeat=repeat)
                for repeat in range(self.repeats) for n in ns for draw in draws for method in methods]
        if self.a.reference_iters:
            epochs = max(1, math.ceil(self.a.reference_iters / self.budget["train_iters"]))
            runs += [dict(method="nnUNetTrainer", n=n, draw=0, epochs=epochs, reference=True) for n in ns]
        # the pre-trainings this call needs (one per group of datasets with agreeing plans), first; one
        # whose runs are done and whose registration is recorded is not rerun when its checkpoint is gone
        pending = [r for r in runs if self._finished(self.run_key(**r)) is None]
        groups = sorted({self.cells[(r["n"], r["draw"])]["pretrain_dataset"] for r in runs})
        loaded = {(self.cells[(r["n"], r["draw"])]["pretrain_dataset"], r.get("repeat", 0)) for r in pending
                  if r["method"] in USES_PRETRAINING}
        used = self.deformation  # the model of the pre-training the runs load
        for dataset_name in groups:
            if (dataset_name, 0) in loaded or (used in deformations
                                               and not self.registration_recorded(used, dataset_name)):
                self.pretrain(used, dataset_name)
            if used in deformations:  # how well it registers is known before hours of training
                self.registration(used, dataset_name)
            for repeat in sorted(r for d, r in loaded if d == dataset_name and r):  # the repeats' own seeds
                self.pretrain(used, dataset_name, repeat)
        if deformations:
            self.unregistered_dice()
        self.preprocess_pools(runs)
        self.train_all(runs)
        for dataset_name in groups:
            for deformation in deformations:
                if not self.registration_recorded(deformation, dataset_name):
                    self.pretrain(deformation, dataset_name)
                self.registration(deformation, dataset_name)
        share_pretraining(self.results)
        self.results["last_call_seconds"] = round(time.time() - t_start, 1)
        self._save()
        write_reports(self.results, self.out, self.report_labels(methods), self.report_ns(ns),
                      budget_iterations(self.budget))

    def report_ns(self, ns) -> List[int]:
        """This call's N and every N of the same budget already in results.json (earlier calls)."""
        return ns_at(self.results, budget_iterations(self.budget), ns)

    def report_labels(self, methods) -> List[str]:
        """This call's rows and every other row of the same budget already in results.json (earlier
        ablation calls), so the table grows with each call."""
        return labels_at(self.results, budget_iterations(self.budget), {self.ablation_of(m)[1] for m in methods})


def ns_at(results: dict, iterations: int, extra=()) -> List[int]:
    """The N columns of one budget's table: `extra` and every N with a run of `iterations`."""
    return sorted(set(extra) | {r["n"] for r in results["runs"] if r["iterations"] == iterations})


def labels_at(results: dict, iterations: int, extra=()) -> List[str]:
    """The rows of one budget's table: `extra` and every label with a run of `iterations` in
    results.json (reference runs apart); in METHODS order, each ablation after its method."""
    labels = set(extra) | {_label(r) for r in results["runs"] if r["iterations"] == iterations
                           and not r.get("reference")}
    def base(label):
        return label.split(" (")[0]
    return sorted(labels, key=lambda x: (METHODS.index(base(x)) if base(x) in METHODS else len(METHODS),
                                         x != base(x), x))


def share_pretraining(results: dict) -> None:
    """Each run that loads a pre-training carries an equal share of its wall time: the seconds of
    the pre-training it loaded / all runs in results.json that load that pre-training (same key and
    iterations), this call's and earlier calls' alike (ablation rows included), so the share does
    not depend on how the study was split into calls, nor on how often a lost checkpoint was rerun
    (an attempt in pretraining_replaced is a recovery cost, kept there). Runs of a pre-training
    replaced before that list was kept keep the share they had."""
    records = {(key, r.get("attempt", 0)): r for key, r in pretraining_attempts(results)}
    loaded = []  # (run, its pre-training's key, the record of the attempt it loaded)
    for r in results["runs"]:
        key = r.get("pretraining", "diffeomorphic")
        record = records.get((key, r.get("pretraining_attempt", 0)))
        if (r["method"] in USES_PRETRAINING and not r.get("reference") and record is not None
                and r.get("pretrain_iterations", record["iterations"]) == record["iterations"]):
            loaded.append((r, key, record))
    users = Counter((key, record["iterations"]) for _, key, record in loaded)
    for r, key, record in loaded:
        share = record["seconds"] / users[key, record["iterations"]]
        r["pretrain_iterations"] = record["iterations"]
        r["pretrain_share_seconds"] = round(share, 1)
        r["wall_seconds"] = round(r["train_seconds"] + r["predict_seconds"] + share, 1)


# ---------------------------------------------------------------------- reports
def _mean_std(values: List[float], runs: Optional[int] = None) -> str:
    """mean ± std (number of values), or (draws, runs) when repeats made the values means of several runs."""
    if not values:
        return "–"
    count = (f"{len(values)} draw{'s' * (len(values) > 1)}, {runs} runs" if runs not in (None, len(values))
             else f"{len(values)}")
    return f"{np.mean(values):.3f} ± {np.std(values):.3f} ({count})"


def draw_means(runs: List[dict], value=lambda r: r["dice_mean"]) -> Dict[int, float]:
    """{draw: the mean of `value` over its runs}: a cell's repeats (--repeats) are averaged first, so
    that means, stds and differences are over draws, each weighing once."""
    per_draw: Dict[int, List[float]] = {}
    for r in runs:
        per_draw.setdefault(r["draw"], []).append(value(r))
    return {d: float(np.mean(v)) for d, v in sorted(per_draw.items())}


def budget_runs(results: dict, iterations: int, label: str, n: int) -> List[dict]:
    """The runs of one table cell: this label and N at the budget's iterations, reference runs apart.
    The Dice columns, the wall-time column and the per-structure table all count these."""
    return [r for r in results["runs"] if not r.get("reference") and r["iterations"] == iterations
            and _label(r) == label and r["n"] == n]


def summarise(results: dict, methods, ns, iterations: int) -> Dict[str, Dict[int, List[float]]]:
    """{method label: {N: [mean Dice per draw (over its repeats)]}} of the budget runs (reference runs excluded)."""
    return {m: {n: list(draw_means(budget_runs(results, iterations, m, n)).values()) for n in ns} for m in methods}


def write_reports(results: dict, out: Path, methods, ns, iterations: int) -> None:
    """results.md and results.png: the table of the budget with the most runs first (a study's own;
    this call's rows and N, given by methods, ns and iterations, included), then one section per
    other budget in results.json (a longer-budget call on the same -o), then the registration records."""
    sections = {iterations: (methods, ns)}
    for k in {r["iterations"] for r in results["runs"] if not r.get("reference")} - {iterations}:
        sections[k] = labels_at(results, k), ns_at(results, k)
    order = sorted(sections, key=lambda k: (-sum(r["iterations"] == k and not r.get("reference")
                                                 for r in results["runs"]), k))
    main_methods, main_ns = sections[order[0]]
    def refs_of(i, k):  # the study's table lists every reference run; a longer budget's, those of its length
        return [r for r in results["runs"] if r.get("reference") and r["n"] in sections[k][1]
                and (i == 0 or r["iterations"] == k)]
    refs = [refs_of(i, k) for i, k in enumerate(order)]
    b = results["budget_iterations"]
    lines = [f"# gemini_benchmark: {results.get('dataset')}", "",
             f"Last call: budget `{results.get('budget')}` ({b['train_epochs']} epochs x {b['train_iters']} "
             f"supervised iterations), pre-training {b['pretrain_epochs']} x {b['pretrain_iters']} iterations; "
             f"device {results.get('device')} "
             f"({results.get('machine', {}).get('gpu') or results.get('machine', {}).get('processor')}, "
             f"{results.get('machine', {}).get('cpu_count')} CPUs).",
             f"Command: `{' '.join(results.get('command', []))}`", ""]
    for i, k in enumerate(order):
        lines += ([f"## {k} supervised iterations per run", ""] if i else []) + \
            _budget_lines(results, *sections[k], k, refs[i])
    reg = dict(results.get("registration", {}))
    for r in results.get("pretraining_replaced", []):  # a deformer a rerun replaced keeps its row
        if "registration" in r:
            reg[f"{r['key']} (attempt {r.get('attempt', 0)}, replaced)"] = r["registration"]
    if reg:
        what = next((r["pairs_of"] for r in reg.values() if "pairs_of" in r), "ordered test pairs")
        lines += ["", f"Registration of {what} with the pre-trained deformer (gemini_register): warped-label "
                  "mean foreground Dice and fraction of voxels with Jacobian determinant <= 0:", "",
                  "| model | pairs | warped-label Dice | folding fraction (mean / max) |", "|---|---|---|---|"]
        for name in sorted(reg, key=lambda k: (k != "unregistered", k != ZERO_FIELD, k)):
            r = reg[name]
            folding = (f"{r['folding_fraction_mean']:.5f} / {r['folding_fraction_max']:.5f}"
                       if "folding_fraction_mean" in r else "–")
            label = name if name in ("unregistered", ZERO_FIELD) else \
                f"{name} ({r['pretrain_iterations']} pre-train it)"
            lines.append(f"| {label} | {r['pairs']} | {r['dice_mean']:.3f} ± {r['dice_std']:.3f} | {folding} |")
    (out / RESULTS_MD).write_text("\n".join(lines) + "\n")
    _plot(summarise(results, main_methods, main_ns, order[0]), refs[0], main_ns, out / RESULTS_PNG, results)


def _budget_lines(results: dict, methods, ns, iterations: int, refs: List[dict]) -> List[str]:
    """One budget's tables: test Dice (with the reference runs given), per structure, per-draw
    differences and the selection set."""
    table = summarise(results, methods, ns, iterations)
    lines = [f"Mean foreground test Dice (imagesTs vs labelsTs) after {iterations} supervised iterations, "
             "mean ± std over draws (number of draws; of runs where a draw was repeated, its runs averaged first):",
             "",
             "| method | " + " | ".join(f"N = {n}" for n in ns) + " | mean wall time / run (s) |",
             "|---|" + "---|" * len(ns) + "---|"]
    for m in methods:
        walls = [r["wall_seconds"] for n in ns for r in budget_runs(results, iterations, m, n)
                 if "same_run_as" not in r]  # a run recorded from its twin took no time of its own
        lines.append(f"| {m} | " + " | ".join(_mean_std(table[m][n], len(budget_runs(results, iterations, m, n)))
                                              for n in ns)
                     + (f" | {np.mean(walls):.0f} |" if walls else " | – |"))
    for r in sorted(refs, key=lambda r: (r["iterations"], r["n"])):
        lines.append(f"| nnUNetTrainer, reference {r['iterations']} it (draw {r['draw']}) | "
                     + " | ".join(f"{r['dice_mean']:.3f}" if r["n"] == n else "" for n in ns)
                     + f" | {r['wall_seconds']:.0f} |")
    structures = next((list(r["dice_per_structure"]) for r in results["runs"]), [])
    if structures:
        lines += ["", "Dice per structure (mean over draws):", "",
                  "| method | N | " + " | ".join(structures) + " |", "|---|---|" + "---|" * len(structures)]
        for m in methods:
            for n in ns:
                runs = budget_runs(results, iterations, m, n)
                if runs:
                    lines.append(f"| {m} | {n} | " + " | ".join(
                        f"{np.nanmean(list(draw_means(runs, lambda r: r['dice_per_structure'][s]).values())):.3f}"
                        for s in structures) + " |")
    return lines + _difference_lines(results, methods, ns, iterations) + \
        _selection_lines(results, methods, ns, iterations) + _repeat_lines(results, methods, ns, iterations)


def _difference_lines(results: dict, methods, ns, iterations: int) -> List[str]:
    """Per-draw test Dice minus nnUNetTrainer's of the same N and draw (and GEMINI minus Finetune:
    what the loss adds beyond the pre-trained start)."""
    def by_draw(label, n):
        return draw_means(budget_runs(results, iterations, label, n))
    pairs = [(m, "nnUNetTrainer") for m in methods if m != "nnUNetTrainer"]
    if "nnUNetTrainerGEMINI" in methods and "nnUNetTrainerGEMINIFinetune" in methods:
        pairs.append(("nnUNetTrainerGEMINI", "nnUNetTrainerGEMINIFinetune"))
    rows = []
    for m, base in pairs:
        for n in ns:
            ours, theirs = by_draw(m, n), by_draw(base, n)
            draws = sorted(set(ours) & set(theirs))
            if draws:
                diffs = [ours[d] - theirs[d] for d in draws]
                rows.append(f"| {m} − {base} | {n} | " + ", ".join(f"draw {d}: {x:+.3f}" for d, x in zip(draws, diffs))
                            + f" | {np.mean(diffs):+.3f} |")
    if not rows:
        return []
    return ["", "Per-draw differences of mean foreground test Dice (same N, same draw; a repeated draw's runs "
            "averaged first):", "",
            "| difference | N | per draw | mean |", "|---|---|---|---|"] + rows


def _selection_lines(results: dict, methods, ns, iterations: int) -> List[str]:
    """The selection set's table (collection studies): the set options and defaults are chosen on."""
    if not any("selection" in r for r in results["runs"]):
        return []
    size = len(results.get("collection", {}).get("selection", [])) or "?"
    lines = ["", f"Mean foreground Dice on the selection set ({size} cases; for choosing options, never the test "
             "set), mean ± std over draws:", "", "| method | " + " | ".join(f"N = {n}" for n in ns) + " |",
             "|---|" + "---|" * len(ns)]
    for m in methods:
        cells = []
        for n in ns:
            scored = [r for r in budget_runs(results, iterations, m, n) if "selection" in r]
            cells.append(_mean_std(list(draw_means(scored, lambda r: r["selection"]["dice_mean"]).values()),
                                   len(scored)))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def _repeat_lines(results: dict, methods, ns, iterations: int) -> List[str]:
    """Every run of each repeated cell (--repeats): how far runs that differ only by their random
    initialisation and sampling lie apart, the yardstick for the differences above."""
    rows = []
    for m in methods:
        for n in ns:
            runs = budget_runs(results, iterations, m, n)
            for draw in sorted({r["draw"] for r in runs}):
                dice = [r["dice_mean"] for r in sorted(runs, key=lambda r: r.get("repeat", 0)) if r["draw"] == draw]
                if len(dice) > 1:
                    rows.append(f"| {m} | {n} | {draw} | " + ", ".join(f"{x:.3f}" for x in dice)
                                + f" | {np.mean(dice):.3f} ± {np.std(dice):.3f} | {max(dice) - min(dice):.3f} |")
    if not rows:
        return []
    return ["", "Repeated cells: the test Dice of each run (repeat 0, 1, ...; the pre-trained methods' repeat r "
            "loads a pre-training seeded r above the first's):", "",
            "| method | N | draw | runs | mean ± std | range |", "|---|---|---|---|---|---|"] + rows


def _plot(table, refs, ns, path: Path, results: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for i, (method, per_n) in enumerate(table.items()):
        xs = [n for n in ns if per_n[n]]
        if xs:
            ax.errorbar(np.array(xs) * (1 + 0.02 * (i - (len(table) - 1) / 2)), [np.mean(per_n[n]) for n in xs],
                        yerr=[np.std(per_n[n]) for n in xs], marker="o", capsize=3, label=method)
    for iterations in sorted({r["iterations"] for r in refs}):
        pts = sorted((r["n"], r["dice_mean"]) for r in refs if r["iterations"] == iterations)
        ax.plot(*zip(*pts), "k--", marker="s", mfc="none", label=f"nnUNetTrainer, {iterations} it (reference)")
    ax.set_xscale("log")
    ax.set_xticks(list(ns))
    ax.minorticks_off()  # log axis: no "3x10^0" labels between the N ticks
    ax.set_xticklabels([str(n) for n in ns])
    ax.set_xlabel("labelled training cases N")
    ax.set_ylabel("mean foreground test Dice")
    title = f"{results.get('dataset')}, budget {results.get('budget')}, {results.get('device')}"
    ax.set_title(textwrap.fill(title, 80), fontsize=8)  # budget overrides make it long: wrap, never clip
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[1]:  # a study with no scored run yet plots empty axes, no legend
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------- CLI
def _main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(
        prog="gemini_benchmark", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Label-efficiency study: for N labelled cases x draws (gemini_fewshot_split folds) train each "
                    "method with the same number of supervised iterations, predict imagesTs with nnUNetv2_predict, "
                    "score Dice against labelsTs; plus registration quality of the pre-trained deformer. Writes "
                    f"{RESULTS_JSON}, {RESULTS_MD} and {RESULTS_PNG} into -o; a second call skips finished runs.")
    p.add_argument("-d", default=None, help="dataset id or name (with imagesTs/labelsTs); default: the synthetic "
                                            "demo dataset (--demo_id), generated when missing")
    p.add_argument("--demo_id", type=int, default=DEMO_ID, help="dataset id of the generated demo dataset")
    p.add_argument("--n", type=int, nargs="+", default=[1, 2, 5], help="numbers of labelled training cases")
    p.add_argument("--draws", type=int, default=3, help="random draws of the N cases")
    p.add_argument("--repeats", type=int, default=1, metavar="R",
                   help="runs per method, N and draw: nnU-Net's training is not seeded, and with 1 or 2 labelled "
                        "cases one run measures its random initialisation as much as the method. A pre-trained "
                        "method's repeat r > 0 loads a pre-training of its own, seeded r above --pretrain_seed's. "
                        "Tables average a draw's runs first, then the draws, and list every repeated cell's runs")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="methods to compare")
    p.add_argument("--budget", choices=list(BUDGETS), default="short", help=f"iteration budget ({_budget_help()})")
    for key in ("train_epochs", "train_iters", "val_iters", "pretrain_epochs", "pretrain_iters"):
        p.add_argument(f"--{key}", type=int, default=None, help=f"override the budget's {key.replace('_', ' ')}")
    for flag, (var, label, applies_to, what, default) in ABLATIONS.items():
        who = ("the methods with the GEMINI loss" if applies_to is USES_GEMINI_LOSS else
               "NoPretrain (the others: --pretrain_deformer_input)" if applies_to is FRESH_DEFORMER else
               "the pre-trainings and the methods that load them" if flag in PRETRAIN_ABLATIONS else
               "the methods that load the pre-training" if applies_to is USES_PRETRAINING else
               "every GEMINI trainer")
        whose = ("the released loss's" if flag in RELEASED_PRETRAIN_FLAGS else
                 "gemini_pretrain's" if flag in PRETRAIN_ABLATIONS else "the trainers'")
        kind = dict(choices=CHOICE_ABLATIONS[flag]) if flag in CHOICE_ABLATIONS else \
            dict(type=int, metavar=INTEGER_ABLATIONS[flag]) if flag in INTEGER_ABLATIONS else \
            dict(type=float, metavar="S" if "share" in what else "W" if "weight" in what else "LR")
        p.add_argument(f"--{flag}", default=None, **kind,
                       help=f"ablation: {var} ({what}) for {who}; their runs are rows of their own, labelled "
                            f"'{label.split(' {')[0]} ...'. Default: {whose} ({default})")
    p.add_argument("--reference_iters", type=int, default=None, metavar="K",
                   help="one extra nnUNetTrainer run per N (draw 0) with about K supervised iterations (the study's "
                        "nnUNetTrainer run of that cell and length is the same training, recorded from it)")
    p.add_argument("--registration", choices=("both", *DEFORMATIONS, "none"), default=None,
                   help="registration quality of the pre-trained deformer: both deformation models (a "
                        "pre-training of each), one of them, or none. Default: both on -d (ordered test pairs); "
                        "with --collection the one the runs load (--gemini_deformation; selection-set pairs)")
    p.add_argument("-device", default=None, help="cuda|cpu|mps; default: cuda when available, else cpu")
    p.add_argument("--jobs", type=int, default=1,
                   help="trainings (each with its prediction) run at the same time: worth it on a GPU that one "
                        "small-patch training leaves mostly idle (their data augmentation workers share the CPU "
                        "cores: nnUNet_n_proc_DA = cores / K - 1 unless set); keep 1 on a CPU")
    c = p.add_argument_group("collection study (--collection): every nnU-Net folder lives under -o")
    c.add_argument("--collection", default=None, metavar="DIR",
                   help="a labelled collection instead of -d: DIR/images/ + DIR/labels/ (same file names, one "
                        "channel) or an nnU-Net raw dataset (only its imagesTr/labelsTr are drawn). One seed draws "
                        "the test set, the unlabelled pool, the selection set and the N labelled cases of each draw; "
                        "each (N, draw) becomes its own dataset (imagesTr = the N cases, imagesUnlabeled = the pool, "
                        "imagesTs = the test set), planned from its N cases, trained on fold all")
    c.add_argument("--test_cases", type=int, default=30, help="test set size")
    c.add_argument("--pool_cases", type=int, default=40, help="unlabelled pool size (imagesUnlabeled)")
    c.add_argument("--selection_cases", type=int, default=10,
                   help="selection set size: scored like the test set, for choosing options and defaults")
    c.add_argument("--split_seed", type=int, default=0, help="seed of the whole split (test, pool, selection, draws)")
    c.add_argument("--channel_name", default="MRI",
                   help="channel name when DIR has no dataset.json (nnU-Net's normalisation: 'CT' selects CT "
                        "normalisation, anything else z-score); labels are then named label_<value>")
    p.add_argument("-o", default="gemini_benchmark", help="output folder (results, logs, predictions)")
    p.add_argument("--seed", type=int, default=0, help="seed of the few-shot draws")
    p.add_argument("--own_nnunet_folders", action="store_true",
                   help="keep nnUNet_raw/_preprocessed/_results inside -o even when the nnUNet_* variables are set")
    a = p.parse_args(argv)
    overrides = [a.train_epochs, a.train_iters, a.val_iters, a.pretrain_epochs, a.pretrain_iters, a.reference_iters,
                 a.pretrain_length]
    if a.draws < 1 or a.repeats < 1 or min(a.n) < 1 or a.jobs < 1 or any(v is not None and v < 1 for v in overrides):
        raise GeminiUserError("--n, --draws, --repeats, --jobs, --reference_iters, --pretrain_length and the budget "
                              "overrides must be positive")
    def finite(v):
        return v is None or 0 <= v < float("inf")
    if a.gemini_weight is not None and not (finite(a.gemini_weight) and a.gemini_weight > 0):
        raise GeminiUserError("--gemini_weight must be a finite number > 0 (the GEMINI trainers refuse 0: "
                              "nnUNetTrainerGEMINIFinetune is the supervised-only method)")
    if a.pretrain_seed is not None and a.pretrain_seed < 0:
        raise GeminiUserError("--pretrain_seed must be an integer >= 0")
    for flag in ("pretrain_decorrelation", "pretrain_encoder_decorrelation"):
        if not finite(getattr(a, flag)):
            raise GeminiUserError(f"--{flag} must be a finite weight >= 0")
    for flag in ("gemini_rampup", "gemini_warmup"):
        if getattr(a, flag) is not None and not 0 <= getattr(a, flag) <= 1:
            raise GeminiUserError(f"--{flag} must be a share of the run between 0 and 1")
    for flag in ("gemini_deformer_lr", "gemini_lr", "pretrain_restoration_weight", "pretrain_lr",
                 "pretrain_deformer_lr"):
        if getattr(a, flag) is not None and not (finite(getattr(a, flag)) and getattr(a, flag) > 0):
            raise GeminiUserError(f"--{flag} must be a finite number > 0")
    if a.collection is not None and a.d is not None:
        raise GeminiUserError("-d and --collection exclude each other: a collection study builds its own datasets")
    out = Path(a.o).resolve()
    # a collection study's datasets never enter the user's nnU-Net folders
    folders = nnunet_folders(out, use_env=not a.own_nnunet_folders and a.collection is None)
    for f in folders.values():
        os.makedirs(f, exist_ok=True)
    bench = Benchmark(a, out, folders)
    bench.argv = argv
    bench.execute()
    print(f"\n{(out / RESULTS_MD).read_text()}")
    print(f"results: {out / RESULTS_JSON}, {out / RESULTS_MD}, {out / RESULTS_PNG}")
    return 0


def main(argv=None):
    sys.exit(run_cli(_main, argv))


if __name__ == "__main__":
    main()
