#!/usr/bin/env bash
# The real-data label-efficiency study (issue 13's target: hippocampus MRI, split seed 0, test 30 / pool 40 /
# selection 10, N = 1 2 (5 with N="1 2 5"), 2 draws, 500 supervised and 500 pre-training iterations, plus the
# nnUNetTrainer reference at 1250) on a lent CUDA GPU in ONE call; figures and logs land in $OUT.
# Only the working tree travels to the device machine: copy the collection into the git-ignored .collection/
# first and carry it with the wheels (the results.json of an earlier call can be carried too, see RESUME):
#
#   mkdir -p .collection && cp -r /path/to/hippocampus_dev .collection/   # images/ + labels/ of the collection
#   run: benchmarks/gpu_real_study.sh   carry: [".whl", ".collection"]   timeout_s: 600
#   DEV=cpu SKIP_INSTALL=1 JOBS=1 N=1 DRAWS=1 SIZES="--test_cases 3 --pool_cases 4 --selection_cases 2" \
#     BUDGET="--budget short --train_epochs 1 --train_iters 2 --val_iters 1 --pretrain_epochs 1 --pretrain_iters 2" \
#     REFERENCE=2 benchmarks/gpu_real_study.sh                                      # dry run on the CPU
#   RESUME=/path/to/earlier/results.json ...   # continue a study: its finished runs are skipped
#   EXTRA="--methods nnUNetTrainerGEMINIFinetune nnUNetTrainerGEMINI --pretrain_decorrelation 10" ...  # an ablation
#   BUDGET="--budget standard --train_epochs 5 --train_iters 250 --val_iters 10 --pretrain_epochs 5 --pretrain_iters 100" \
#     EXTRA="--methods nnUNetTrainer nnUNetTrainerGEMINIFinetune nnUNetTrainerGEMINI --pretrain_decorrelation 10 \
#     --pretrain_encoder_decorrelation 10" ...   # every cell at 1250 supervised it from the best start (the CPU's next question)
#   EXTRA="--methods nnUNetTrainerGEMINIFinetune nnUNetTrainerGEMINI --pretrain_decorrelation 10 \
#     --pretrain_encoder_decorrelation 10 --pretrain_deformer_input images" ...  # the deformer sees the images
#   N="1 2" EXTRA="--repeats 3 --methods nnUNetTrainer nnUNetTrainerGEMINI --pretrain_decorrelation 10 \
#     --pretrain_encoder_decorrelation 10" ...  # 3 runs per cell (two CPU runs of a cell differ by 0.029 at N = 1,
#                                     0.011 at N = 2), the pre-trained arm from 3 pre-trainings (seeds 12345-12347)
#   EXTRA="--methods nnUNetTrainerGEMINI --pretrain_length 40" ...  # 4000 pre-training it beside the study's (~6 min on an H200;
#                                     it continues the study's 500 when that ran in this call: checkpoints do not come back)
set -u
T0=$(date +%s)
OUT=${OUT:-/tmp/gpu_real_study_out}; mkdir -p "$OUT"
DEV=${DEV:-cuda}
COLLECTION=${COLLECTION:-.collection/hippocampus_dev}
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/gpu_real_study_log.txt") 2>&1
[ -z "${SKIP_INSTALL:-}" ] && source benchmarks/gpu_install.sh
[ -d "$COLLECTION" ] || { echo "no collection at $COLLECTION: copy it there and carry it (see the header)"; exit 2; }
[ -n "${RESUME:-}" ] && mkdir -p "$OUT/study" && cp "$RESUME" "$OUT/study/results.json"
SIZES=${SIZES:-"--test_cases 30 --pool_cases 40 --selection_cases 10"}
BUDGET=${BUDGET:-"--budget standard --train_epochs 2 --train_iters 250 --val_iters 10 --pretrain_epochs 5 \
--pretrain_iters 100"}
left=$(( ${BUDGET_S:-560} - ($(date +%s) - T0) ))
echo "=== gemini_benchmark --collection $COLLECTION $SIZES --split_seed 0 --n ${N:-1 2} --draws ${DRAWS:-2} $BUDGET" \
     "--reference_iters ${REFERENCE:-1250} --jobs ${JOBS:-8} -device $DEV ${EXTRA:-} (limit ${left}s)"
timeout -k 10 $left gemini_benchmark --collection "$COLLECTION" $SIZES --split_seed 0 --n ${N:-1 2} \
    --draws ${DRAWS:-2} $BUDGET --reference_iters ${REFERENCE:-1250} --jobs ${JOBS:-8} -device $DEV -o "$OUT/study" \
    ${EXTRA:-}
echo "=== study rc=$? $(( $(date +%s) - T0 )) s"
# what may be committed (numbers, case ids, logs); the datasets, predictions and checkpoints stay behind
mkdir -p "$OUT/publish/logs" && cp "$OUT"/study/results.{json,md,png} "$OUT/publish/" 2>/dev/null
cp "$OUT"/study/logs/*.log "$OUT/publish/logs/" 2>/dev/null
echo "=== done $(( $(date +%s) - T0 )) s"
