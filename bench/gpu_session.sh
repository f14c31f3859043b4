#!/usr/bin/env bash
# One prepared GPU session (issues 6 and 21) in one call of the device tool, about 10 minutes:
#     run(command="LLMPY_COMMIT=<git rev-parse --short HEAD> bash bench/gpu_session.sh",
#         timeout_s=600)
# (the device gets a copy of the working tree without .git, so the commit is passed in)
# It installs nothing: the GPU image has torch, triton and transformers; the repository is used
# in place. Each part has its own time limit (`timeout`), so one that hangs or runs long costs
# only its own share:
#   1. the GPU tests: every kernel in fp32 and bf16 against the reference (GPT-2's and the
#      decoder's: tests/test_gpu_decoder.py), the shared op and whole-model tests on the gpu
#      backend, bench gpu's own side, and torchrun + NCCL on the one GPU;
#   2. `llmpy bench gpu` for GPT-2 124M (B=64, T=1024), the Llama-3.2-1B shape and the
#      Gemma-3-270M shape (T=2048, the largest B of those given that fits), each against its
#      torch.compile baseline, the sides interleaved in blocks of steps; each run starts with 20
#      steps of bf16 against float32 (losses within 0.01).
# Writes to $OUT (default: out): device.txt, tests.log, bench.log (every bench's stderr),
# bench_<model>.json (raw), session.txt (the summary printed last). Where the session runs on a
# GPU of its own (not through the device tool), the same files are copied into bench/gpu/ as
# <gpu>_<commit>_<file>; through the device tool, copy them from the returned folder.
# Record the numbers, with the device, date and commit, in bench/RESULTS.md.
#
#     bash bench/gpu_session.sh --dry-run
# runs the same script on the CPU in Triton's interpreter (TRITON_INTERPRET=1) at tiny shapes
# of the same models, collecting the tests instead of running them and copying nothing into
# bench/gpu/: a check of the script for CI (tests/test_bench.py), whose numbers mean nothing.
set -uo pipefail
dry=0
case "${1:-}" in
    --dry-run) dry=1 ;;
    "") ;;
    *) echo "usage: bash bench/gpu_session.sh [--dry-run]" >&2; exit 2 ;;
esac
export OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export LLMPY_COMMIT=${LLMPY_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}

# the models, each with its batch sizes and T; then each part's limit in seconds
models=("d12 -b 64 -t 1024" "llama-3.2-1b -b 16 8 -t 2048" "gemma3-270m -b 16 8 -t 2048")
bench_args=(--steps 20 --block 5 --warmup 3 --track-steps 20)
tests_limit=150 bench_limit=(110 150 130)
pytest_run=()
if (( dry )); then
    export TRITON_INTERPRET=1
    bench_args=(--dry-run --steps 2 --block 1 --warmup 1 --track-steps 2)
    models=("d12 -b 1 -t 8" "llama-3.2-1b -b 1 -t 8" "gemma3-270m -b 1 -t 8")
    tests_limit=60 bench_limit=(60 60 60)
    pytest_run=(--collect-only)
fi

{ if (( dry )); then echo "dry run: CPU, Triton's interpreter"
  else nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; fi
  python3 -c "from importlib.metadata import version as v
print(' | '.join(f'{p} {v(p)}' for p in ('torch', 'triton', 'transformers')))"
  echo "commit $LLMPY_COMMIT | $(date -u +%F)"
} 2>&1 | tee "$OUT/device.txt"

echo "=== 1. GPU tests"
t0=$SECONDS
# the decoder's first: they have never run on a GPU, and a part cut short loses its end
timeout "$tests_limit" python3 -m pytest -q -s -p no:cacheprovider "${pytest_run[@]}" \
    tests/test_gpu_decoder.py tests/test_decoder_ops.py tests/test_llama.py tests/test_gpu.py \
    tests/test_ops.py tests/test_gpt2.py tests/test_bench.py \
    tests/test_distributed.py::test_nccl_on_one_gpu_matches_one_process \
    -k "gpu and not cli and not session" \
    2>&1 | tee "$OUT/tests.log" | grep -v "test_gpu:"
tests_rc=${PIPESTATUS[0]}
echo "tests: exit $tests_rc in $((SECONDS - t0)) s"

echo "=== 2. llmpy bench gpu"
: >"$OUT/bench.log"
bench_rc=0
for i in "${!models[@]}"; do
    read -ra m <<<"${models[$i]}"
    t0=$SECONDS
    echo "--- ${m[*]}" >>"$OUT/bench.log"
    timeout "${bench_limit[$i]}" python3 -m llmpy bench gpu --model "${m[@]}" "${bench_args[@]}" \
        --json >"$OUT/bench_${m[0]}.json" 2>>"$OUT/bench.log"
    rc=$?
    echo "bench ${m[0]}: exit $rc in $((SECONDS - t0)) s" | tee -a "$OUT/bench.log"
    (( rc )) && bench_rc=$rc
done

echo "=== summary"
{ cat "$OUT/device.txt"
  echo "tests (exit $tests_rc): $(tail -n 1 "$OUT/tests.log")"
  echo "bf16 kernel errors (max |err| / max |ref|; tolerance 3e-2):"
  grep -o "test_gpu: .*bfloat16.*" "$OUT/tests.log" | sed 's/^test_gpu: /  /' | sort -u
  grep -o "test_gpu: losses.*" "$OUT/tests.log"
  # one process for every report (each one would import torch)
  python3 - "${models[@]}" <<'PY'
import json, os, sys
from llmpy.bench.gpu import summary
out = os.environ["OUT"]
for spec in sys.argv[1:]:
    model = spec.split()[0]
    print(f"--- bench {model}:")
    try:
        print(summary(json.load(open(os.path.join(out, f"bench_{model}.json")))))
    except (OSError, ValueError, KeyError) as e:     # cut short: what its log says
        print(f"no report ({type(e).__name__}); from bench.log:")
        with open(os.path.join(out, "bench.log")) as f:
            lines = f.read().split(f"--- {spec}\n", 1)[-1].split("\n--- ", 1)[0]
        print("\n".join(lines.splitlines()[-8:]))
PY
} 2>&1 | tee "$OUT/session.txt"

if (( ! dry )) && [ "$OUT" != bench/gpu ]; then
    gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1 |
          awk '{print tolower($NF)}')
    for f in device.txt tests.log bench.log session.txt bench_*.json; do
        [ -f "$OUT/$f" ] && cp "$OUT/$f" "bench/gpu/${gpu}_${LLMPY_COMMIT}_$f"
    done
fi
exit $(( tests_rc || bench_rc ))
