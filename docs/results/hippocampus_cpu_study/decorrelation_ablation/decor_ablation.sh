#!/usr/bin/env bash
# Ablation (selection set): gemini_pretrain --decorrelation W (9908f9d), then trainer TR (default Finetune) N=2 draw 0,
# the benchmark's commands and budget by hand (written before gemini_benchmark --pretrain_decorrelation).
W=${W:-10}; TR=${TR:-nnUNetTrainerGEMINIFinetune}
cd /work/scratch/study_clone4 && . .venv/bin/activate
S=/work/scratch/hippo_study; D=/work/scratch/decor_w$W; R=$D/nnUNet_results; mkdir -p $R
export nnUNet_raw=$S/nnUNet_raw nnUNet_preprocessed=$S/nnUNet_preprocessed nnUNet_results=$R nnUNet_def_n_proc=1 \
  nnUNet_n_proc_DA=0 OMP_NUM_THREADS=${THREADS:-2} PYTHONUNBUFFERED=1
P=$R/Dataset901_GeminiStudyN1draw0/GEMINIPretrain__nnUNetPlans__3d_fullres/fold_all
t0=$(date +%s)
[ -f $P/checkpoint_final.pth ] || gemini_pretrain -d 901 -c 3d_fullres -p nnUNetPlans -device cpu --epochs 5 \
  --iters_per_epoch 100 --deformation diffeomorphic --decorrelation $W > $D/pretrain.log 2>&1 || exit 1
t1=$(date +%s); echo "pretrain $((t1-t0)) s"
L=$R/Dataset903_GeminiStudyN2draw0/GEMINIPretrain__nnUNetPlans__3d_fullres/fold_all; mkdir -p $L
ln -sf $P/checkpoint_final.pth $L/checkpoint_final.pth
F=$R/Dataset903_GeminiStudyN2draw0/${TR}__nnUNetPlans__3d_fullres/fold_all
[ -f $F/checkpoint_final.pth ] || nnUNet_gemini_num_epochs=2 nnUNet_gemini_iters_per_epoch=250 nnUNet_gemini_val_iters=10 \
  nnUNet_gemini_final_validation=0 nnUNetv2_train 903 3d_fullres all -tr ${TR} -p nnUNetPlans \
  -device cpu > $D/train_${TR}.log 2>&1 || exit 1
t2=$(date +%s); echo "train $((t2-t1)) s"
for set in Selection Ts; do
  nnUNetv2_predict -i $S/nnUNet_raw/Dataset903_GeminiStudyN2draw0/images$set -o $D/pred_${TR}_$set -d 903 -c 3d_fullres \
    -p nnUNetPlans -f all -tr ${TR} -device cpu -npp 1 -nps 1 > $D/predict_${TR}_$set.log 2>&1 || exit 1
  python -c "
import json; from nnunet_gemini.workflow import score_predictions
labels = json.load(open('$S/nnUNet_raw/Dataset903_GeminiStudyN2draw0/dataset.json'))['labels']
s = score_predictions('$S/nnUNet_raw/Dataset903_GeminiStudyN2draw0/labels$set', '$D/pred_${TR}_$set', labels, '$D/summary_${TR}_$set.json')
print('$set', {k: v for k, v in s.items() if not isinstance(v, (dict, list))})"
done
echo "done $(( $(date +%s) - t0 )) s"
