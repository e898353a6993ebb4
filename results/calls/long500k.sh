# #22's headline: one 8B QLoRA step at 500,000 tokens under an 80 GiB cap (host memory <= 100 GiB), on an H200
# (needs_h200: the cap is set inside the 139 GiB card). The step takes longer than one command, so part `a`
# starts it detached (setsid) and returns; part `b`, the next call on the same warm machine, waits and collects.
#   carry [".benchsite"]; bash results/calls/long500k.sh s28-9 a; then bash results/calls/long500k.sh s28-9 b
ID=$1; . results/calls/env.sh
if [ "$2" = a ]; then
  setsid nohup python bench.py --json /tmp/long500k.json --device_call "$ID" --shape 8b --mode qlora --batch 1 \
    --seq 500000 --cap 80 --steps 1 --warmup 0 --contenders nanotune-long --worker_timeout 1500 \
    > /tmp/long500k.log 2>&1 < /dev/null &
  sleep 500; tail -5 /tmp/long500k.log
else
  while pgrep -f "long500k.json" > /dev/null; do sleep 10; done
  tail -8 /tmp/long500k.log; cp /tmp/long500k.json /tmp/long500k.log "$OUT/"
fi
