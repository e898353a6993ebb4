# #39's Qwen3.5 rows: the chunk scan's pipelining depth (scan_depth.py), then the 4B and the 35B-A3B-shaped LoRA
# rows, nanotune and HF + PEFT, Unsloth given 280 s (it did not finish in 120 s in s27-5). ~9 min.
#   carry [".benchsite"]; bash results/calls/qwen35.sh s28-1
ID=$1; . results/calls/env.sh
python results/calls/scan_depth.py 2>&1 | tail -20
for shape in qwen35-4b qwen35moe; do
  bench --shape $shape --mode lora --contenders nanotune,hf_peft --worker_timeout 150 | tail -4
  bench --shape $shape --mode lora --contenders unsloth --worker_timeout 280 | tail -3
done
