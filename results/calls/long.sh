# #22's speed rows: plain nanotune (its default settings) vs Unsloth, 8B QLoRA batch 1 at 128k then 32k, one warm-up
# step each (the point: tokens/s >= Unsloth's; s26-5 measured nanotune-long at 0.96x at 128k). ~8 min.
#   carry [".benchsite"]; bash results/calls/long.sh s28-6
ID=$1; . results/calls/env.sh
bench --shape 8b --mode qlora --batch 1 --seq 131072 --steps 2 --warmup 1 --contenders nanotune,unsloth | tail -4
bench --shape 8b --mode qlora --batch 1 --seq 32768 --steps 3 --warmup 1 --contenders nanotune,unsloth | tail -4
