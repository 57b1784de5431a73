#!/bin/bash
export PYTHONPATH=.
mkdir -p /tmp/res
run() {  # name, flags...
  local name=$1; shift
  timeout 120 torchrun --standalone --nproc-per-node 2 benchmarks/migration.py --backend nccl \
    --no-throughput --layers-per-step 0 --iters 14 --json /tmp/res/$name.json --markdown /tmp/res/$name.md "$@" \
    > /tmp/res/$name.log 2>&1
  echo "$name rc=$? $(python3 -c "import json;r=json.load(open('/tmp/res/$name.json'))['pause'][0];print(round(r['total_ms'],2), round(r['plain_ms'],2), r['total_ms_runs'])")"
}
for round in 1 2; do
  run r${round}_ramp1_reg --ramp 1
  run r${round}_ramp0_reg --ramp 0
  run r${round}_ramp2_reg --ramp 2
  run r${round}_ramp1_unreg --ramp 1 --unregistered
  run r${round}_ramp0_unreg --ramp 0 --unregistered
done
run trace_ramp1_reg --ramp 1 --trace $OUT/trace_ramp1_reg.txt
run trace_ramp0_unreg --ramp 0 --unregistered --trace $OUT/trace_ramp0_unreg.txt
head -4 $OUT/trace_ramp1_reg.txt; head -4 $OUT/trace_ramp0_unreg.txt
