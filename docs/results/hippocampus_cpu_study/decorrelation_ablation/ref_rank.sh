#!/usr/bin/env bash
# nnUNetTrainer N=2 draw 0 retrained (the study's budget) only for its features' rank (probe_feature_rank)
cd /work/scratch/study_clone4 && . .venv/bin/activate
S=/work/scratch/hippo_study; R=/work/scratch/ref_rank/nnUNet_results; mkdir -p $R
export nnUNet_raw=$S/nnUNet_raw nnUNet_preprocessed=$S/nnUNet_preprocessed nnUNet_results=$R nnUNet_def_n_proc=1 \
  nnUNet_n_proc_DA=0 OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
nnUNet_gemini_num_epochs=2 nnUNet_gemini_iters_per_epoch=250 nnUNet_gemini_val_iters=10 nnUNet_gemini_final_validation=0 \
  nnUNetv2_train 903 3d_fullres all -tr nnUNetTrainerEnvBudget -p nnUNetPlans -device cpu
