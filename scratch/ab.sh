#!/bin/bash
# A/B of the rebalance on 2 GPUs: variants interleaved, then the GPU tests.
export PYTHONPATH=.
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1
python3 -c "import torch; print(torch.__version__, torch.cuda.nccl.version())"
run() {  # name, flags...
  local name=$1; shift
  timeout 120 torchrun --standalone --nproc-per-node 2 benchmarks/migration.py --backend nccl \
    --no-throughput --layers-per-step 0 --json $OUT/$name.json --markdown $OUT/$name.md "$@" \
    > $OUT/$name.log 2>&1
  echo "$name rc=$? $(grep -E '^\| all' $OUT/$name.md)"
}
for round in 1 2; do
  run r${round}_default
  run r${round}_unreg --unregistered
  run r${round}_noramp --no-ramp
  run r${round}_old --no-ramp --unregistered
done
run phases_default --phases
timeout 240 python3 -m pytest -q -o addopts="" -p no:cacheprovider tests/test_weight_migration.py -m gpu > $OUT/tests.txt 2>&1
echo "tests rc=$?"; tail -15 $OUT/tests.txt
