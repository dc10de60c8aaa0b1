#!/usr/bin/env bash
# The GPU checks of one lent-GPU session, as ONE script (device time is scarce): install, then stages
# in order of importance, each under its own time limit and all under one deadline, so a slow stage
# costs the later ones and never the whole run. Figures go to stdout and $OUT/gpu_log.txt.
#
#   benchmarks/gpu_check.sh                    # on a CUDA machine (carries .whl: see below)
#   DEV=cpu SHAPE="24 32 32" SKIP_INSTALL=1 QUICK=1 benchmarks/gpu_check.sh   # dry run of the stages here
#
# The device machine has PyTorch but not nnU-Net: .whl/ holds nnunetv2 and its missing dependencies as
# py3.12 wheels, and .whl/sitk.tar.xz SimpleITK's unpacked wheel (its .whl is too big to carry). Made here with
# `pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 ...` of
# nnunetv2==2.8.1 dynamic_network_architectures batchgenerators batchgeneratorsv2 blosc2 ndindex numexpr pydantic
# pydantic-core annotated-types typing-inspection nibabel connected-components-3d graphviz yacs future unittest2
# linecache2 traceback2, `pip wheel --no-deps acvl_utils==0.2.6` (sdist only), and for SimpleITK 2.5.7:
# unzip the wheel into a folder and `tar -C folder -cJf .whl/sitk.tar.xz .` (28.7 MB). .whl/ is git-ignored.
set -u
OUT=${OUT:-/tmp/gpu_check_out}; mkdir -p "$OUT"
DEV=${DEV:-cuda}
SHAPE=${SHAPE:-"160 192 192"}      # -> nnU-Net plans a 128^3 patch, batch 2: a typical 3d_fullres plan
NP=${NP:-8}
W=${W:-/tmp/gpu_work}; rm -rf "$W"; mkdir -p "$W"/raw "$W"/pre "$W"/res
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-540} ))
export nnUNet_raw=$W/raw nnUNet_preprocessed=$W/pre nnUNet_results=$W/res PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/gpu_log.txt") 2>&1

stage() {  # stage NAME LIMIT_S CMD...: runs CMD under min(LIMIT_S, time to the deadline)
    local name=$1 limit=$2; shift 2
    local left=$(( DEADLINE - $(date +%s) ))
    (( left < limit )) && limit=$left
    if (( limit < 15 )); then echo "=== $name SKIPPED (deadline)"; return; fi
    echo "=== $name (limit ${limit}s) $(date +%T)"
    local s=$(date +%s)
    timeout -k 10 "$limit" "$@"
    echo "=== $name rc=$? $(( $(date +%s) - s )) s"
}

[ -z "${SKIP_INSTALL:-}" ] && source benchmarks/gpu_install.sh
python3 -c "import torch, nnunetv2, SimpleITK; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
stage doctor 60 gemini_doctor

# A demo dataset of typical size, planned by nnU-Net itself.
D=982
stage data 150 bash -c "gemini_demo_dataset -d $D --labeled 4 --unlabeled 4 --test 0 --shape $SHAPE --spacing 1 1 1 \
    && nnUNetv2_plan_and_preprocess -d $D -c 3d_fullres -np $NP -npfp $NP > $W/plan.log \
    && gemini_pretrain -d $D --preprocess_only -np $NP"
python3 -c "import json; c=json.load(open('$W/pre/Dataset${D}_GeminiDemo/nnUNetPlans.json'))['configurations']['3d_fullres']; print('plan: patch', c['patch_size'], 'batch', c['batch_size'])"

IT=${IT:-10}; WU=${WU:-3}; [ -n "${QUICK:-}" ] && IT=1 && WU=1
# Issue 4's benchmark: ours (AMP) vs nnUNetTrainer vs the released-style reference, + AMP off, + compile.
AC=--amp_compile; [ "$DEV" = cpu ] && AC=
stage bench_pretrain 240 python3 benchmarks/bench_pretrain.py -d $D -device $DEV --iters $IT --warmup $WU -np $NP $AC
# The CLI as a user runs it (AMP on CUDA), then the same entry point under torchrun (env://, NCCL).
stage pretrain_cli 90 gemini_pretrain -d $D -device $DEV --epochs 2 --iters_per_epoch $(( IT * 2 )) --save_every 1 -o $W/pt_cli
grep -h "epoch_time_s\|mixed precision" $W/pt_cli/training_log_*.txt | sort -u
cp $W/pt_cli/progress.png "$OUT/pretrain_progress.png" 2>/dev/null; cp $W/pt_cli/example_pair_epoch_0002.png "$OUT/" 2>/dev/null
stage pretrain_torchrun 90 torchrun --standalone --nproc_per_node 1 -m nnunet_gemini.pretraining.run_pretraining \
    -d $D -device $DEV --epochs 1 --iters_per_epoch $IT -o $W/pt_torchrun
ls $W/pt_torchrun
stage bench_trainer 100 python3 benchmarks/bench_trainer.py -d $D -c 3d_fullres --iters $IT --warmup $WU --device $DEV \
    --json "$OUT/bench_trainer.json"
NCC=--cuda-only; [ "$DEV" = cpu ] && NCC=--cpu-only
stage bench_ncc 60 python3 benchmarks/bench_ncc.py $NCC --sizes 96 128
# README command 1's job on the GPU: the whole workflow at the quick budget, with its wall time and Dice.
B=quick; [ -n "${QUICK:-}" ] && B=smoke
stage demo_$B 240 gemini_demo --budget $B -device $DEV --work_dir $W/demo
cp $W/demo/*.json "$OUT/" 2>/dev/null || tail -n 25 $W/demo/gemini_demo_logs/*.log
echo "=== done $(date +%T)"
