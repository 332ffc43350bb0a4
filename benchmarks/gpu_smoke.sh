#!/usr/bin/env bash
# GPU smoke check: the CUDA test module and the benchmark on the GPU, in under 10 minutes on one
# modern GPU. Run from the repository root with ebflow installed (pip install -e '.[test]');
# writes gpu-smoke/{pytest.txt,bench.md,env.txt}. Commit the folder with the GPU named.
set -uo pipefail
out="${1:-gpu-smoke}"
mkdir -p "$out"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "nvidia-smi: not found"
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count())"
} > "$out/env.txt" 2>&1
timeout 360 python -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_gpu_readiness.py > "$out/pytest.txt" 2>&1
tests=$?
timeout 200 python -m benchmarks --device cuda --out "$out/bench" > "$out/bench.md" 2>&1
bench=$?
cat "$out/env.txt"; tail -n 3 "$out/pytest.txt"; tail -n 20 "$out/bench.md"
echo "pytest exit $tests, benchmark exit $bench"
exit $(( tests != 0 || bench != 0 ))
