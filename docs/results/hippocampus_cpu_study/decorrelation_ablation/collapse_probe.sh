#!/usr/bin/env bash
# which pre-training term collapses the features? 100-iteration pre-trainings, then probe_feature_rank
cd /work/main && . .venv/bin/activate
S=/work/scratch/hippo_study; P=/work/scratch/collapse_probe; mkdir -p $P
export nnUNet_raw=$S/nnUNet_raw nnUNet_preprocessed=$S/nnUNet_preprocessed nnUNet_results=$S/nnUNet_results OMP_NUM_THREADS=1 nnUNet_def_n_proc=1 PYTHONPATH=.
for v in joint no_restoration; do
  extra=""; [ $v = no_restoration ] && extra=--no_restoration
  [ -f $P/$v/checkpoint_final.pth ] || gemini_pretrain -d 901 -device cpu --epochs 1 --iters_per_epoch 100 $extra -o $P/$v > $P/$v.log 2>&1
  echo "== $v rc=$? $(date)"
done
python benchmarks/probe_feature_rank.py --checkpoint $P/joint/checkpoint_final.pth --also $P/no_restoration/checkpoint_final.pth $S/nnUNet_results/Dataset901_GeminiStudyN1draw0/GEMINIPretrain__nnUNetPlans__3d_fullres/fold_all/checkpoint_final.pth --pool $S/nnUNet_preprocessed/Dataset901_GeminiStudyN1draw0/nnUNetPlans_3d_fullres_gemini_unlabeled --patches 8 --json $P/probe.json
