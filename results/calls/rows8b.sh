# #39's Llama-3.1-8B LoRA rows, Unsloth beside: 2 x 4096 (target >= 14,500 tok/s on an H100 and >= 1.3x Unsloth at
# <= its peak) and 4 x 2048 (>= 1.3x); nanotune bf16, with an FP8 base, and FP8 with fast accumulation. s27-2 at
# 4 x 2048: 1.12x / 1.41x / 1.47x; s16-5 at 2 x 4096 (bf16): 11,528 vs 10,299. ~9 min.
#   carry [".benchsite"]; bash results/calls/rows8b.sh s28-11
ID=$1; . results/calls/env.sh
for bs in "2 4096" "4 2048"; do
  set -- $bs
  bench --shape 8b --mode lora --batch $1 --seq $2 --contenders unsloth,nanotune,nanotune-fp8,nanotune-fp8fast \
    --worker_timeout 200 | tail -6
done
