#!/bin/bash
export PYTHONPATH=.
mkdir -p /tmp/res
timeout 150 torchrun --standalone --nproc-per-node 2 benchmarks/migration.py --backend nccl \
  --no-throughput --layers-per-step 0 --iters 6 --host-profile $OUT/hostprof.txt \
  --json /tmp/res/p.json > /tmp/res/p.log 2>&1; echo "prof rc=$?"
timeout 300 torchrun --standalone --nproc-per-node 2 benchmarks/migration.py --backend nccl \
  --phases --json $OUT/full.json --markdown $OUT/full.md > /tmp/res/full.log 2>&1; echo "full rc=$?"
grep -E "^\| [0-9]|^\| all" $OUT/full.md
