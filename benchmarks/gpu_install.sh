# Sourced by the GPU scripts: installs nnunetv2 + its missing dependencies from the carried .whl/ folder
# (the device machine has PyTorch but no internet; how .whl/ is made: see gpu_check.sh) and this project.
s=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
tar -C /tmp/site -xJf .whl/sitk.tar.xz
export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . \
    || python3 -m pip install -q --no-index --no-deps --no-build-isolation .
echo "=== install $(( $(date +%s) - s )) s"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
