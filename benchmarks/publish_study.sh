#!/usr/bin/env bash
# Copy what a gemini_benchmark study may commit (numbers, case ids, logs, plots) from its -o folder to DEST:
# results.{json,md,png}, logs/, and per run or pre-training the training logs and progress plots (runs/).
# Never the datasets, predictions or checkpoints (a CC-BY-SA collection's derivatives stay out of the
# repository). A run's or pre-training's logs and plots are copied once results.json records it finished
# (not while it runs or after it was killed), and of a run or pre-training only the training logs its
# finished attempt left in its folder (not those of a rerun still going there);
# the preparing stages' logs always. Run it with the project installed.
#   benchmarks/publish_study.sh /scratch/study DEST   # DEST: a folder under the docs results folder
set -eu
src=$1 dest=$(mkdir -p "$2" && cd "$2" && pwd)
mkdir -p "$dest/logs" "$dest/runs"
cp "$src"/results.json "$src"/results.md "$src"/results.png "$dest/" 2>/dev/null || true
python3 - "$src" "$dest" <<'PY'
import json, pathlib, shutil, sys
from nnunet_gemini.benchmark import REPLACED_PLOT, finished_outputs
src, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
logs, folders = finished_outputs(json.loads((src / "results.json").read_text()))
for log in sorted((src / "logs").glob("*.log")):
    if log.name in logs or not log.name.startswith(("train_", "predict_", "pretrain_")):
        shutil.copy(log, dest / "logs")
for folder, own_logs in sorted(folders.items()):
    run_logs = [f for f in sorted((src / folder).glob("training_log_*.txt")) if own_logs is None or f.name in own_logs]
    # while a pre-training's rerun goes on, progress.png is its in-progress plot and the finished
    # attempt's waits beside it (gemini_benchmark puts it back when the rerun ends)
    set_aside = src / folder / REPLACED_PLOT
    for f in run_logs + sorted((src / folder).glob("progress*.png")):
        (dest / "runs" / folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(set_aside if f.name == "progress.png" and set_aside.is_file() else f, dest / "runs" / folder / f.name)
PY
