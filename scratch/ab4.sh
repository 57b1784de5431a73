#!/bin/bash
export PYTHONPATH=.
mkdir -p /tmp/res
run() {  # name, flags...
  local name=$1; shift
  timeout 120 torchrun --standalone --nproc-per-node 2 benchmarks/migration.py --backend nccl \
    --no-throughput --layers-per-step 0 --iters 14 --json /tmp/res/$name.json --markdown /tmp/res/$name.md "$@" \
    > /tmp/res/$name.log 2>&1
  echo "$name rc=$? $(python3 -c "import json;r=json.load(open('/tmp/res/$name.json'))['pause'][0];print(round(r['total_ms'],2), round(r['plain_ms'],2), r.get('plain_registered_ms'), r['total_ms_runs'])")"
}
NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=REG run dbg_reg --iters 2 --warmup 1
grep -i "regist\|zero" /tmp/res/dbg_reg.log | sed 's/0x[0-9a-f]*//g; s/buffSize [0-9]*//' | sort | uniq -c | sort -rn | head -8
grep -i "error\|Traceback" /tmp/res/dbg_reg.log | head -5
for round in 1 2 3; do
  run r${round}_reg
  run r${round}_unreg --unregistered
done
