#!/usr/bin/env bash
# The label-efficiency study on a CUDA GPU in ONE lent-GPU call (issue 6: "a standard-budget run there too",
# cut to what a 15-minute lease allows) and, at the same time, a functional check of the COMPILED GEMINI
# trainer (nnU-Net compiles the network by default on CUDA). Figures and logs land in $OUT.
#
#   benchmarks/gpu_study.sh                   # on a CUDA machine (carries .whl/, see gpu_check.sh)
#   DEV=cpu SKIP_INSTALL=1 JOBS=2 N="1" DRAWS=1 STUDY="--budget short --train_epochs 1 --train_iters 2 \
#       --pretrain_epochs 1 --pretrain_iters 2" COMPILE_ITERS=2 benchmarks/gpu_study.sh   # dry run here
#   ABLATION="--gemini_rampup 0.33" benchmarks/gpu_study.sh   # then the same study with a ramp-up, same -o
#   ABLATION="--gemini_rampup 0.33; --gemini_pair_positions independent" ...  # several ablation calls
set -u
T0=$(date +%s)
OUT=${OUT:-/tmp/gpu_study_out}; mkdir -p "$OUT"
DEV=${DEV:-cuda}
NP=${NP:-8}
W=${W:-/tmp/gpu_study_work}; rm -rf "$W"; mkdir -p "$W"/raw "$W"/pre "$W"/res
export nnUNet_raw=$W/raw nnUNet_preprocessed=$W/pre nnUNet_results=$W/res PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/gpu_study_log.txt") 2>&1
[ -z "${SKIP_INSTALL:-}" ] && source benchmarks/gpu_install.sh
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

# The demo dataset the CPU study used (id 991, default generator settings), planned once, pool preprocessed
# once (the compiled check and the benchmark's pre-training would otherwise both write it).
D=991
s=$(date +%s)
gemini_demo_dataset -d $D > $W/dataset.log && nnUNetv2_plan_and_preprocess -d $D -c 3d_fullres -np $NP -npfp $NP \
    > $W/plan.log && gemini_pretrain -d $D --preprocess_only -np $NP > $W/pool.log || { tail -n 30 $W/*.log; exit 1; }
echo "=== dataset + plan + pool $(( $(date +%s) - s )) s"

# Compiled GEMINI trainer (nnUNet_compile=t, nnU-Net's CUDA default), its own results folder, in the background.
CI=${COMPILE_ITERS:-25}
( s=$(date +%s)
  nnUNet_compile=t nnUNet_results=$W/res_compile nnUNet_gemini_num_epochs=3 nnUNet_gemini_iters_per_epoch=$CI \
  nnUNet_gemini_val_iters=2 nnUNet_gemini_final_validation=0 nnUNet_n_proc_DA=2 \
  timeout -k 10 ${COMPILE_S:-300} nnUNetv2_train $D 3d_fullres all -tr nnUNetTrainerGEMINI_NoPretrain -device $DEV \
  > "$OUT/compiled_trainer.log" 2>&1
  echo "=== compiled GEMINI trainer rc=$? $(( $(date +%s) - s )) s"
  grep -E "compil|Epoch time|train_loss|gemini" "$OUT/compiled_trainer.log" | head -n 30 ) &
COMPILED_PID=$!

# The study: every method, N = 1 2, 2 draws, JOBS trainings at a time, under the script's deadline
# (resumable: whatever finished is in results.json).
STUDY=${STUDY:-"--budget standard --train_epochs 6 --pretrain_epochs 10"}
study() {  # study NAME [EXTRA FLAGS...]: the benchmark on $OUT/study under what is left of the deadline
    local name=$1 left=$(( ${BUDGET_S:-540} - ($(date +%s) - T0) )) s=$(date +%s); shift
    echo "=== $name (limit ${left}s): gemini_benchmark -device $DEV $STUDY --n ${N:-1 2} --draws ${DRAWS:-2}" \
         "--jobs ${JOBS:-8} $*"
    (( left > 30 )) && timeout -k 10 $left gemini_benchmark -device $DEV -o "$OUT/study" $STUDY --n ${N:-1 2} \
        --draws ${DRAWS:-2} --jobs ${JOBS:-8} --registration diffeomorphic "$@"
    echo "=== $name rc=$? $(( $(date +%s) - s )) s"
}
study study
# Optional ablations on the same -o (finished runs are skipped; only the GEMINI-loss methods train again),
# one call per ';'-separated entry, e.g. ABLATION="--gemini_rampup 0.33; --gemini_weight 0.3".
IFS=';' read -ra ABLATIONS <<< "${ABLATION:-}"
for a in "${ABLATIONS[@]}"; do [ -n "${a// /}" ] && study "ablation $a" $a; done
for f in "$OUT"/study/logs/train_*_N1_draw0_*.log; do  # epoch times of one draw: first (start-up) and last
    echo "$(basename $f): $(grep -o 'Epoch time: [0-9.]* s' $f | sed -n '1p;$p' | tr '\n' ' ')"; done
wait $COMPILED_PID  # not a bare wait: it would also wait for the tee of the exec above
echo "=== done $(( $(date +%s) - T0 )) s"
