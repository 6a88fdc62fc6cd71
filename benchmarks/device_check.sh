#!/usr/bin/env bash
# The checks that need a GPU or a many-core machine, as one script (run on a lent H200 machine with
# 16 CPU cores; logs into $OUT, or benchmarks/results):
#   the CUDA tests; the kernel benchmark on the GPU (one rank); strong scaling 1 -> 16 CPU workers.
#     bash benchmarks/device_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} OMP_NUM_THREADS=1
out=${OUT:-benchmarks/results}
py=${PYTHON:-python3}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; echo "cores: $(nproc --all)";
  $py -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"; } 2>&1 | tee "$out/device_info.txt"
timeout 100 $py -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -15 | tee "$out/gpu_tests.txt"
timeout 150 $py benchmarks/bench_kernels.py --device cuda --no-landed --steps 5 2>&1 | tee "$out/gpu_kernels.txt"
timeout 180 $py benchmarks/bench_scaling.py 2>&1 | tee "$out/cpu_scaling.txt"
cp benchmarks/results/kernels_cuda.json benchmarks/results/scaling.json "$out/" 2>/dev/null || true
