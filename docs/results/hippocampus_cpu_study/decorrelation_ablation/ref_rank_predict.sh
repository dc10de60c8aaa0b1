#!/usr/bin/env bash
# after ref_rank.sh: predict and score the rerun nnUNetTrainer N=2 draw 0 (run-to-run spread of the baseline)
while pgrep -f ref_rank.sh > /dev/null; do sleep 20; done
cd /work/scratch/study_clone4 && . .venv/bin/activate
S=/work/scratch/hippo_study; D=/work/scratch/ref_rank; R=$D/nnUNet_results
export nnUNet_raw=$S/nnUNet_raw nnUNet_preprocessed=$S/nnUNet_preprocessed nnUNet_results=$R nnUNet_def_n_proc=1 OMP_NUM_THREADS=1
for set in Selection Ts; do
  nnUNetv2_predict -i $S/nnUNet_raw/Dataset903_GeminiStudyN2draw0/images$set -o $D/pred_$set -d 903 -c 3d_fullres \
    -p nnUNetPlans -f all -tr nnUNetTrainerEnvBudget -device cpu -npp 1 -nps 1 > $D/predict_$set.log 2>&1 || exit 1
  python -c "
import json; from nnunet_gemini.workflow import score_predictions
labels = json.load(open('$S/nnUNet_raw/Dataset903_GeminiStudyN2draw0/dataset.json'))['labels']
s = score_predictions('$S/nnUNet_raw/Dataset903_GeminiStudyN2draw0/labels$set', '$D/pred_$set', labels, '$D/summary_$set.json')
print('$set', {k: v for k, v in s.items() if not isinstance(v, (dict, list))})"
done
