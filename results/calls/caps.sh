# #22's caps: the longest 8B QLoRA sequence under CAP GiB, nanotune-long from its plan stepping down, Unsloth by
# doubling from START then halving the gap (bench_long.longest_context). 16 GiB ~7 min, 24 ~9; 40 needs two calls.
#   carry [".benchsite"]; bash results/calls/caps.sh s28-7 16 32768 1   (then: ... s28-8 24 65536 0)
# A fifth argument picks the contenders: `caps.sh ID 80 262144 0 unsloth` is Unsloth's side of the 500k row (H200).
ID=$1; CAP=$2; START=$3; WARMUP=${4:-1}; WHO=${5:-nanotune-long,unsloth}; . results/calls/env.sh
bench --shape 8b --mode qlora --batch 1 --seq "$START" --max_context "$CAP" --steps 1 --warmup "$WARMUP" \
  --contenders $WHO --worker_timeout 500 | tail -4
