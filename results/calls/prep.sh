# On this (CPU) machine before a device call: the peers in .benchsite (bench_wheels.sh), and for the GPU test tiers
# the references CI uses in .gpu/site (the GPU image has transformers 5.17, the tests need 5.25's Mamba2 models).
# Both folders are ignored by git; carry them by name (together well under the 64 MiB a call may carry).
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -d .benchsite ] || bash ../shared/tools/bench_wheels.sh
grep -qx "/.gpu/" .git/info/exclude || echo "/.gpu/" >> .git/info/exclude
rm -rf .gpu/site .gpu/wheels && mkdir -p .gpu/site .gpu/wheels
for p in transformers==5.25.0 peft==0.22.0 kernels huggingface_hub tomlkit typer gguf trl==1.16.0; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d .gpu/wheels "$p"
done
for w in .gpu/wheels/*.whl; do python3 -m zipfile -e "$w" .gpu/site; done
rm -rf .gpu/wheels; du -sh .benchsite .gpu/site
