#!/usr/bin/env bash
# Prepares what the GPU check carries (both folders are git-ignored; name them in `carry`):
#   .gpu_wheels/  the pure-Python wheels the GPU machine lacks: ott-jax and its jaxopt (its
#                 lineax, equinox, jaxtyping and optax are there) and ml-collections, the
#                 versions of requirements.txt; TensorFlow, tfds, clu and dm-pix are not needed
#   .gpu_data/cifar10.npz  the shared CIFAR-10 JPEGs, TRAIN_PER_CLASS training and
#                 TEST_PER_CLASS test images of each class, as their original bytes (the
#                 embedded demo's format, alignmix_jax/data/demo/build.py)
# and checks that what travels stays under the 64 MiB of a `run` call.
#   bash launch/gpu_prepare.sh [SOURCE=../shared/data/cifar10-jpeg]
set -euo pipefail
cd "$(dirname "$0")/.."
SOURCE=${1:-../shared/data/cifar10-jpeg}
TRAIN_PER_CLASS=${TRAIN_PER_CLASS:-5000}
TEST_PER_CLASS=${TEST_PER_CLASS:-1000}
PYTHON=${PYTHON:-.venv/bin/python}
LIMIT_MIB=60  # of the 64 MiB a call carries, some left for files not counted here

rm -rf .gpu_wheels && mkdir -p .gpu_wheels .gpu_data
pin() { grep -i "^$1==" requirements.txt; }
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform any -d .gpu_wheels \
    "$(pin ott-jax)" "$(pin ml-collections)" jaxopt==0.8.5
"$PYTHON" -m alignmix_jax.data.demo.build --source "$SOURCE" --output .gpu_data/cifar10.npz \
    --train_per_class "$TRAIN_PER_CLASS" --test_per_class "$TEST_PER_CLASS"

# What a `run` call sends: tracked and untracked-not-ignored files, and the carried folders.
tree_bytes=$(git ls-files -z --cached --others --exclude-standard \
             | xargs -0 stat -L -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
carried_bytes=$(du -sb .gpu_wheels .gpu_data | awk '{s += $1} END {print s}')
total_mib=$(( (tree_bytes + carried_bytes) / 1048576 ))
echo "wheels: $(ls .gpu_wheels | tr '\n' ' ')($(du -sh .gpu_wheels | cut -f1))"
echo "archive: $(du -sh .gpu_data/cifar10.npz | cut -f1), $((TRAIN_PER_CLASS * 10)) training and $((TEST_PER_CLASS * 10)) test images"
echo "travels: $total_mib MiB (working tree $((tree_bytes / 1048576)) MiB + carried $((carried_bytes / 1048576)) MiB)"
if (( total_mib > LIMIT_MIB )); then
    echo "error: $total_mib MiB would travel, over $LIMIT_MIB: lower TRAIN_PER_CLASS" >&2
    exit 1
fi
