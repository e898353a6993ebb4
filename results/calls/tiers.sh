# #39's GPU test tiers with CI's references (prep.sh). Part 1: kernels, mixers, model, quant, lora; part 2: train
# (its subprocess tests start CUDA and Triton afresh: 200 s a test). ~8 min each; logs come back in $OUT.
#   carry [".gpu"]; bash results/calls/tiers.sh s28-4 1   (then ... s28-5 2)
ID=$1; PART=${2:-1}; . results/calls/env.sh
[ -d /tmp/site ] || pip install -q --no-deps --target /tmp/site .gpu/wheels/*.whl
export PYTHONPATH=/tmp/site:$PWD/.gpu/bnb:$PWD TORCHDYNAMO_DISABLE=1
python -c "import transformers, peft; print('transformers', transformers.__version__, 'peft', peft.__version__)"
files=$([ "$PART" = 1 ] && echo "kernels mixers model quant lora" || echo "train")
for f in $files; do  # (one command may run 600 s: the files share 570 of them)
  [ $SECONDS -lt 560 ] || { echo "$f: not run (time)"; continue; }
  # (the cross-compile for three GPUs is CI's check on a CPU, ~4 min; here the kernels run for real)
  timeout $((570 - SECONDS)) python -m pytest -q -p no:cacheprovider -m "not default_model" \
    --timeout 200 -k "not compiles_for_hopper" \
    tests/test_$f.py > "$OUT/tier-$f.log" 2>&1 || true
  echo "$f: $(tail -1 "$OUT/tier-$f.log")"
done
