#!/bin/bash
export PYTHONPATH=.
mkdir -p /tmp/res
python3 -c "import torch.distributed as d; o=d.ProcessGroupNCCL.Options(); print('config' , hasattr(o,'config'), [a for a in dir(o.config) if not a.startswith('_')] if hasattr(o,'config') else '')"
run() {  # name, flags...
  local name=$1; shift
  timeout 120 torchrun --standalone --nproc-per-node 2 benchmarks/migration.py --backend nccl \
    --no-throughput --layers-per-step 0 --iters 14 --json /tmp/res/$name.json --markdown /tmp/res/$name.md "$@" \
    > /tmp/res/$name.log 2>&1
  echo "$name rc=$? $(python3 -c "import json;r=json.load(open('/tmp/res/$name.json'))['pause'][0];print(round(r['total_ms'],2), round(r['plain_ms'],2), r.get('plain_registered_ms'), r['total_ms_runs'])")"
}
for round in 1 2; do
  run r${round}_default
  run r${round}_ctas32 --nccl-ctas 32 64
  run r${round}_ctas16 --nccl-ctas 16 32
  run r${round}_unreg --unregistered
done
NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=REG run dbg_reg --iters 2 --warmup 1
grep -i "regist\|zero" /tmp/res/dbg_reg.log | sort | uniq -c | sort -rn | head -12
tail -5 /tmp/res/r1_ctas32.log
