# On this (CPU) machine before a device call: the peers in .benchsite (bench_wheels.sh), and for the GPU test tiers
# the references CI uses in .gpu (the GPU image has transformers 5.17, the tests need 5.25's Mamba2 models).
# Both folders are ignored by git; a call carries one of them (each under the 64 MiB a call may carry).
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -d .benchsite ] || bash ../shared/tools/bench_wheels.sh
grep -qx "/.gpu/" .git/info/exclude || echo "/.gpu/" >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu/wheels .gpu/bnb  # (unpacked, transformers alone is 61 MB: the wheels travel zipped)
plat="--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux2014_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64"
python3 -m pip download -q $plat -d .gpu/wheels transformers==5.25.0  # with all it needs (hub 2.x, kernels, ...)
python3 -m pip download -q $plat --no-deps -d .gpu/wheels peft==0.22.0 gguf
rm .gpu/wheels/numpy-*  # (the image's numpy stays: 16 MB less to carry)
python3 -m pip install -q --no-deps --target .benchsite .gpu/wheels/gguf-*.whl  # (the image lacks it)
cp -r .benchsite/bitsandbytes .gpu/bnb/  # (the NF4 reference, its CUDA 13 library only)
du -sh .benchsite .gpu
