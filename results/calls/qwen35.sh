# #39's Qwen3.5 rows. `qwen35.sh ID`: the chunk scan's precision and pipelining depth (scan_depth.py), then the 4B and
# the 35B-A3B-shaped LoRA rows, nanotune and HF + PEFT (~6 min). `qwen35.sh ID unsloth`: Unsloth on both shapes, 280 s
# each (it did not finish its warm-up in 120 s in s27-5), as a second command (~10 min).
#   carry [".benchsite"]; bash results/calls/qwen35.sh s28-1; then bash results/calls/qwen35.sh s28-2 unsloth
ID=$1; . results/calls/env.sh
if [ "${2:-}" = unsloth ]; then
  for shape in qwen35-4b qwen35moe; do
    bench --shape $shape --mode lora --contenders unsloth --worker_timeout 280 | tail -3
  done
else
  python results/calls/scan_depth.py 2>&1 | tail -12
  for shape in qwen35-4b qwen35moe; do
    bench --shape $shape --mode lora --contenders nanotune,hf_peft --worker_timeout 150 | tail -4
  done
fi
