#!/bin/bash
# Build 5 A/B on a quiet CPU: the study's training is paused (SIGSTOP) for the measurement and resumed after
T=$(pgrep -f "nnUNetv2_train 901 3d_fullres all -tr nnUNetTrainerGEMINI" | head -1)
kill -STOP $T; date +"paused %T (pid $T)"
trap 'kill -CONT $T; date +"resumed %T"' EXIT
export nnUNet_raw=/work/scratch/hippo_study/nnUNet_raw nnUNet_preprocessed=/work/scratch/hippo_study/nnUNet_preprocessed nnUNet_results=/tmp/bench_results nnUNet_def_n_proc=1 nnUNet_n_proc_DA=0
A="MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647"
for r in 1 2; do
  (cd /work/scratch/base_wt && /work/main/.venv/bin/python /work/scratch/ab_step.py 1 base 2>&1 | tail -1)
  (cd /work/main && /work/main/.venv/bin/python /work/scratch/ab_step.py 1 new 2>&1 | tail -1)
  (cd /work/main && env $A /work/main/.venv/bin/python /work/scratch/ab_step.py 1 new+allocator 2>&1 | tail -1)
done
echo "=== bench_trainer base 674bef4"; (cd /work/scratch/study_clone2 && .venv/bin/python benchmarks/bench_trainer.py -d 901 --iters 5 --device cpu --json /work/scratch/bt_base.json 2>&1 | grep -v warn | tail -7)
echo "=== bench_trainer new"; (cd /work/main && .venv/bin/python benchmarks/bench_trainer.py -d 901 --iters 5 --device cpu --json /work/scratch/bt_new.json 2>&1 | grep -v warn | tail -7)
echo "=== bench_trainer new + allocator"; (cd /work/main && env $A .venv/bin/python benchmarks/bench_trainer.py -d 901 --iters 5 --device cpu --json /work/scratch/bt_alloc.json 2>&1 | grep -v warn | tail -7)
