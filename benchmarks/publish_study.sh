#!/usr/bin/env bash
# Copy what a gemini_benchmark study may commit (numbers, case ids, logs, plots) from its -o folder to DEST:
# results.{json,md,png}, logs/, and per run the training log and progress plots. Never the datasets,
# predictions or checkpoints (a CC-BY-SA collection's derivatives stay out of the repository).
#   benchmarks/publish_study.sh /scratch/study DEST   # DEST: a folder under the docs results folder
set -eu
src=$1 dest=$(mkdir -p "$2" && cd "$2" && pwd)
mkdir -p "$dest/logs" "$dest/runs"
cp "$src"/results.json "$src"/results.md "$src"/results.png "$dest/" 2>/dev/null || true
cp "$src"/logs/*.log "$dest/logs/" 2>/dev/null || true
cd "$src"
find . -path ./predictions -prune -o \( -name 'training_log_*.txt' -o -name 'progress*.png' \) -print | while read -r f; do
    mkdir -p "$dest/runs/$(dirname "$f")" && cp "$f" "$dest/runs/$f"
done
