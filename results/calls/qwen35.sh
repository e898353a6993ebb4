# #39's Qwen3.5 rows. `qwen35.sh ID`: the delta rule alone, Triton against PyTorch (delta_rule.py), then the 4B and
# the 35B-A3B-shaped LoRA rows, nanotune and HF + PEFT, each profiled (~5 min). `qwen35.sh ID unsloth SHAPE`: Unsloth
# on one shape with the whole command's time, 560 s (it did not finish in 120 s, s27-5, nor in 280 s, s29-4;
# bench.py now prints the worker's last lines when it times out: loading, or which step).
#   carry [".benchsite"]; bash results/calls/qwen35.sh s30-1; then bash results/calls/qwen35.sh s30-2 unsloth qwen35-4b
ID=$1; . results/calls/env.sh
if [ "${2:-}" = unsloth ]; then
  bench --shape "${3:-qwen35-4b}" --mode lora --contenders unsloth --worker_timeout 560 | tail -3
else
  python results/calls/delta_rule.py 2>&1 | grep -v Warning | tail -8 || true  # (the rows run even if it fails)
  for shape in qwen35-4b qwen35moe; do  # (per-kernel profiles of both in $OUT)
    bench --shape $shape --mode lora --contenders nanotune,hf_peft --worker_timeout 150 --profile "$OUT/prof" | tail -4
  done
fi
