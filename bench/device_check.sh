#!/usr/bin/env bash
# One command for a lent CUDA machine: the CUDA-only tests, then both benchmarks at quick sizes, every result
# as JSON under $OUT (default bench/results/device_check). Budget: under 8 minutes on one H100-class card.
#
#   bash bench/device_check.sh                 # on the CUDA machine, after the README's install
#   bash bench/device_check.sh --install       # run the README's install (.ci/install) first
#   bash bench/device_check.sh --cpu-dry-run   # the same steps on CPU at toy sizes (tests/test_device_check.py)
#
# Steps (each under its own time limit; one failing does not stop the others):
#   environment.json   torch / CUDA / triton versions, the card, the C++ sampler's instruction set
#   cuda_tests.json    tests/test_cuda.py: Triton kernel vs reference on the card, CUDA-graph replay vs eager,
#                      engine greedy output on CUDA vs CPU (skipped, and reported so, without CUDA)
#   rsd_step.json      bench/bench_rsd_step.py --quick: fused RSD step vs op-by-op PyTorch
#   e2e.json           bench/bench_e2e.py: Engine vs naive HF loop vs one-by-one, random and demo pairs
#   speculative.json   bench/bench_speculative.py: draft_tokens 2 and 4 vs plain RSD (the round as a CUDA graph)
#   summary.json       each step's exit status and seconds; the script exits non-zero if any step failed
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
mode=cuda
for arg in "$@"; do
  case $arg in
    --cpu-dry-run) mode=cpu ;;
    --install) bash .ci/install ;;
    *) echo "device_check.sh: unknown option $arg (use --cpu-dry-run or --install)" >&2; exit 2 ;;
  esac
done
out=${OUT:-bench/results/device_check}
mkdir -p "$out"
steps=()

step() {  # step NAME SECONDS COMMAND...: runs COMMAND under a time limit, records its status
  local name=$1 limit=$2 start rc
  shift 2
  echo "== $name: $*"
  start=$(date +%s)
  timeout "$limit" "$@"
  rc=$?
  steps+=("$name $rc $(( $(date +%s) - start ))")
  echo "== $name: exit $rc"
}

if [ "$mode" = cuda ] && ! $py -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "device_check.sh: torch sees no CUDA device here; use --cpu-dry-run to check the plumbing on CPU" >&2
  exit 2
fi
# The README's editable install builds the C++ sampler in place; a copied tree may not have it built yet.
$py -c "import rsd_engine._C" 2>/dev/null || $py setup.py build_ext --inplace -q

step environment 120 $py - "$out/environment.json" <<'EOF'
import json, os, platform, sys
import rsd_engine  # noqa: F401  (before torch: its OpenMP settings)
import torch
env = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
           cuda_available=torch.cuda.is_available(), cpus=os.cpu_count(), load_average=os.getloadavg(),
           omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"))
if torch.cuda.is_available():
    env.update(gpu=torch.cuda.get_device_name(), capability=torch.cuda.get_device_capability())
try:
    import triton
    env["triton"] = triton.__version__
except ImportError as err:
    env["triton"] = f"not importable: {err}"
from rsd_engine import _C
env["cpp_isa"] = _C.isa()
open(sys.argv[1], "w").write(json.dumps(env, indent=2))
print(json.dumps(env))
EOF

step cuda_tests 240 $py -m pytest -q -rs tests/test_cuda.py --junitxml="$out/cuda_tests.xml"
$py - "$out/cuda_tests.xml" "$out/cuda_tests.json" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError) as err:
    tests = [dict(name="(pytest did not report)", outcome="error", message=str(err))]
else:
    tests = []
    for case in root.iter("testcase"):
        outcome, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            node = case.find(kind)
            if node is not None:
                outcome, message = ("skipped" if kind == "skipped" else "failed"), node.get("message", "")
        tests.append(dict(name=f"{case.get('classname')}::{case.get('name')}", outcome=outcome,
                          seconds=float(case.get("time", 0)), message=message[:500]))
counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "skipped", "error")}
open(sys.argv[2], "w").write(json.dumps(dict(counts=counts, tests=tests), indent=2))
print(counts)
EOF

if [ "$mode" = cuda ]; then
  step rsd_step 120 $py bench/bench_rsd_step.py --quick --device cuda --out "$out/rsd_step.json"
  step e2e 300 $py bench/bench_e2e.py --device cuda --pairs random demo --batches 1 8 --new-tokens 32 \
    --repeats 2 --out "$out/e2e.json"
  step speculative 180 $py bench/bench_speculative.py --device cuda --pairs random --gammas 2 4 --batches 1 8 \
    --new-tokens 32 --repeats 2 --out "$out/speculative.json"
else
  step rsd_step 120 $py bench/bench_rsd_step.py --device cpu --batch 1 2 --vocab 1000 --warmup 1 --repeats 3 \
    --budget 1 --out "$out/rsd_step.json"
  step e2e 300 $py bench/bench_e2e.py --device cpu --pairs random --tiny --vocab 1000 --batches 1 2 \
    --new-tokens 4 --repeats 1 --max-seq-len 256 --cache "$out/pairs" --out "$out/e2e.json"
  step speculative 180 $py bench/bench_speculative.py --device cpu --pairs random --tiny --vocab 1000 --gammas 2 \
    --batches 1 2 --new-tokens 4 --repeats 1 --threads 1 --cache "$out/pairs" --out "$out/speculative.json"
fi

$py - "$out/summary.json" "$mode" "${steps[@]}" <<'EOF'
import json, sys
path, mode, *steps = sys.argv[1:]
rows = [dict(step=name, exit=int(rc), seconds=int(s)) for name, rc, s in (line.split() for line in steps)]
summary = dict(mode=mode, ok=all(r["exit"] == 0 for r in rows), steps=rows)
open(path, "w").write(json.dumps(summary, indent=2))
print(json.dumps(summary))
EOF
failed=$(printf '%s\n' "${steps[@]}" | awk '$2 != 0' | wc -l)
echo "device_check.sh ($mode): results in $out; $failed step(s) failed"
[ "$failed" -eq 0 ]
