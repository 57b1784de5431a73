#!/bin/bash
export PYTHONPATH=.
mkdir -p /tmp/res
timeout 200 python3 -m pytest -q -o addopts="" -p no:cacheprovider tests/test_weight_migration.py tests/test_bytecopy.py -m gpu > $OUT/tests.txt 2>&1
echo "tests rc=$?"; tail -3 $OUT/tests.txt
timeout 240 torchrun --standalone --nproc-per-node 2 benchmarks/migration.py --backend nccl \
  --phases --json $OUT/full.json --markdown $OUT/full.md > /tmp/res/full.log 2>&1; echo "full rc=$?"
grep -E "^\| [0-9]|^\| all" $OUT/full.md
run() {  # name, flags...
  local name=$1; shift
  timeout 120 torchrun --standalone --nproc-per-node 2 benchmarks/migration.py --backend nccl \
    --no-throughput --layers-per-step 0 --iters 14 --json /tmp/res/$name.json --markdown /tmp/res/$name.md "$@" \
    > /tmp/res/$name.log 2>&1
  echo "$name rc=$? $(python3 -c "import json;r=json.load(open('/tmp/res/$name.json'))['pause'][0];print(round(r['total_ms'],2), round(r['plain_ms'],2), r['total_ms_runs'])")"
}
for round in 1 2; do
  run r${round}_ramp1
  run r${round}_ramp0 --ramp 0
done
run trace --trace $OUT/trace.txt
head -3 $OUT/trace.txt
