# #24's follow-up: the 300-step held-out curve with FP8 fast accumulation (the forward GEMM's) beside bf16, same
# seed, same call (s27-3's bf16 seeds 0 / 1 ended 5.4% apart at step 300: the noise floor). If FP8-fast lands
# inside that spread, fast accumulation (1.47x Unsloth in s27-2) can become the default. 1B random-init checkpoint
# (bench.py makes it), the identity data, its first 8 records held out. ~8 min.
#   carry [".benchsite"]; bash results/calls/fp8curve.sh s28-10
ID=$1; . results/calls/env.sh
python bench.py --shape 1b --mode lora --contenders nanotune --steps 1 --warmup 0 --json /tmp/ckpt.json \
  > /dev/null 2>&1 || true  # (it makes the checkpoint)
head -8 examples/identity.jsonl > /tmp/heldout.jsonl; tail -n +9 examples/identity.jsonl > /tmp/train.jsonl
for run in bf16 fp8fast; do
  python -c "import sys, kernels, train; kernels.FP8_FAST_ACCUM = True; train.main(sys.argv[1:])" \
    --model /tmp/nanotune-bench/1b --datasets /tmp/train.jsonl --eval_file /tmp/heldout.jsonl \
    --chat_template chatml --eval_steps 50 --max_steps 300 --seed 0 --output_dir /tmp/curve-$run \
    $([ $run = fp8fast ] && echo --base_dtype float8) > "$OUT/curve-$run.log" 2>&1 || true
  echo "$run: $(grep -i "eval" "$OUT/curve-$run.log" | tail -7 | tr '\n' ' ')"
done
