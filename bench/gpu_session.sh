#!/usr/bin/env bash
# The GPU checks of issue 6 in one call of the device tool (about 5-8 minutes on an H100):
#     run(command="LLMPY_COMMIT=<git rev-parse --short HEAD> bash bench/gpu_session.sh",
#         timeout_s=600)
# (the device gets a copy of the working tree without .git, so the commit is passed in)
# It installs nothing: the GPU image has torch and triton; the repository is used in place.
#   1. the GPU tests: every kernel in fp32 and bf16 against the NumPy reference, the shared op
#      and whole-model tests on the gpu backend (fp32), bf16 training against fp32, bench gpu's
#      own side on a tiny model, and torchrun + NCCL on the one GPU (plain DP and ZeRO-1);
#   2. `llmpy bench gpu`: GPT-2 124M, T=1024, against PyTorch + torch.compile, and where our
#      step's time goes, op by op.
# Writes $OUT/device.txt, gpu_tests.log, bench_gpu.log, bench_gpu.json; prints a summary last.
# Copy the numbers, with the device, date and commit, into bench/RESULTS.md.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, '| triton',
              triton.__version__, '| cuda', torch.version.cuda)"
  echo "commit ${LLMPY_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)} | $(date -u +%F)"
} 2>&1 | tee "$OUT/device.txt"

echo "=== 1. GPU tests"
timeout 180 python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu.py tests/test_ops.py \
    tests/test_gpt2.py tests/test_bench.py tests/test_distributed.py::test_nccl_on_one_gpu_matches_one_process \
    -k "gpu and not cli" \
    2>&1 | tee "$OUT/gpu_tests.log" | grep -v "test_gpu:"
tests_rc=${PIPESTATUS[0]}

echo "=== 2. llmpy bench gpu"
timeout 300 python3 -m llmpy bench gpu --json >"$OUT/bench_gpu.json" 2>"$OUT/bench_gpu.log"
bench_rc=$?

echo "=== summary"
cat "$OUT/device.txt"
echo "tests (exit $tests_rc): $(tail -n 1 "$OUT/gpu_tests.log")"
echo "bf16 kernel errors (max |err| / max |ref|; tolerance 3e-2):"
grep -o "test_gpu: .*bfloat16.*" "$OUT/gpu_tests.log" | sed 's/^test_gpu: /  /' | sort -u
grep -o "test_gpu: losses.*" "$OUT/gpu_tests.log"
echo "bench (exit $bench_rc):"
python3 -c "import json, sys; from llmpy.backends.gpu.bench import summary
print(summary(json.load(open(sys.argv[1]))))" "$OUT/bench_gpu.json" || tail -n 20 "$OUT/bench_gpu.log"
exit $(( tests_rc || bench_rc ))
