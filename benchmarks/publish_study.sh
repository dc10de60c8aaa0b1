#!/usr/bin/env bash
# Copy what a gemini_benchmark study may commit (numbers, case ids, logs, plots) from its -o folder to DEST:
# results.{json,md,png}, logs/, and per run the training log and progress plots. Never the datasets,
# predictions or checkpoints (a CC-BY-SA collection's derivatives stay out of the repository). The logs
# of a run or pre-training are copied once results.json records it finished (not while it runs or
# after it was killed); those of the preparing stages always. Run it with the project installed.
#   benchmarks/publish_study.sh /scratch/study DEST   # DEST: a folder under the docs results folder
set -eu
src=$1 dest=$(mkdir -p "$2" && cd "$2" && pwd)
mkdir -p "$dest/logs" "$dest/runs"
cp "$src"/results.json "$src"/results.md "$src"/results.png "$dest/" 2>/dev/null || true
python3 - "$src" "$dest/logs" <<'PY'
import json, pathlib, shutil, sys
from nnunet_gemini.benchmark import finished_logs
src, dest = pathlib.Path(sys.argv[1]), sys.argv[2]
finished = finished_logs(json.loads((src / "results.json").read_text()))
for log in sorted((src / "logs").glob("*.log")):
    if log.name in finished or not log.name.startswith(("train_", "predict_", "pretrain_")):
        shutil.copy(log, dest)
PY
cd "$src"
find . -path ./predictions -prune -o \( -name 'training_log_*.txt' -o -name 'progress*.png' \) -print | while read -r f; do
    mkdir -p "$dest/runs/$(dirname "$f")" && cp "$f" "$dest/runs/$f"
done
