#!/usr/bin/env bash
# Everything that needs CUDA, in one run (under 8 minutes on one GPU): the gpu-marked tests
# (both simulation paths, bf16-mixed and 16-mixed, buckets on the device, NCCL with one process
# and its ReduceOp.AVG, FSDP2-sharded workers with bf16 compute and fp32 reduce: 1 x 1 and, with
# 2 GPUs, 1 x 2), then bench/gpu_simulate.py's table, then one short summary, also
# written to bench/results/gpu_check.json (or --out DIR).
#
#   bash bench/gpu_check.sh                       # on a machine with a GPU
#   bash bench/gpu_check.sh --device cpu --quick  # anywhere: checks that it all runs (CI does this)
set -euo pipefail
cd "$(dirname "$0")/.."
device=cuda
quick=()
out=bench/results
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device=${2:?--device needs cuda or cpu}; shift 2 ;;
    --quick) quick=(--quick); shift ;;
    --out) out=${2:?--out needs a folder}; shift 2 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (use --device cuda|cpu, --quick, --out DIR)" >&2; exit 2 ;;
  esac
done
case "$device" in cuda | cpu) ;; *) echo "gpu_check.sh: --device must be cuda or cpu, got '$device'" >&2; exit 2 ;; esac
# PYTHON if set, else the project's .venv, else python3
PY=${PYTHON:-}
[ -z "$PY" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
PY=${PY:-python3}
mkdir -p "$out"
start=$(date +%s)

# the tests: on cpu the gpu-marked ones run on the CPU (LOCALSGD_GPU_CHECK_DEVICE), NCCL ones skip
tests_rc=0
LOCALSGD_GPU_CHECK_DEVICE=$device "$PY" -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider \
  --junitxml "$out/gpu_tests.xml" || tests_rc=$?

bench_rc=0
PYTHONPATH=. "$PY" bench/gpu_simulate.py --device "$device" "${quick[@]}" --out "$out/gpu_simulate.json" \
  || bench_rc=$?

"$PY" - "$out" "$device" "$tests_rc" "$bench_rc" "$(( $(date +%s) - start ))" <<'EOF'
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

out, device, tests_rc, bench_rc, seconds = Path(sys.argv[1]), sys.argv[2], *map(int, sys.argv[3:])
suite = ET.parse(out / "gpu_tests.xml").getroot()
suite = suite if suite.tag == "testsuite" else suite[0]
total, failed = int(suite.get("tests", 0)), int(suite.get("failures", 0)) + int(suite.get("errors", 0))
skipped = int(suite.get("skipped", 0))
bench = json.loads((out / "gpu_simulate.json").read_text()) if bench_rc == 0 else {}
summary = {
    "device": bench.get("device", device),
    "tests": {"passed": total - failed - skipped, "failed": failed, "skipped": skipped},
    "gpu_simulate_images_per_s": bench.get("images_per_s"),
    "batched_over_sequential": bench.get("batched_over_sequential"),
    "seconds": seconds,
    "ok": tests_rc == 0 and bench_rc == 0,
}
print(f"\ngpu_check on {summary['device']} in {seconds} s")
t = summary["tests"]
print(f"  gpu tests: {t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped")
if bench:
    ips = bench["images_per_s"]
    print("  gpu_simulate images/s: " + ", ".join(f"{k} {v:.0f}" for k, v in ips.items()))
    print(f"  batched / sequential: {bench['batched_over_sequential']:.2f}")
else:
    print("  gpu_simulate: FAILED")
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
print(f"  {'ok' if summary['ok'] else 'FAILED'}; wrote {out / 'gpu_check.json'}")
sys.exit(0 if summary["ok"] else 1)
EOF
