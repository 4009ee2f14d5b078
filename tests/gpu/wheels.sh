#!/usr/bin/env bash
# Wheels for a GPU machine whose Python has CUDA PyTorch but neither pip access nor kdbench's
# other needs: tensorly, PyWavelets and jsonschema (with the packages jsonschema needs), at the
# versions of this checkout's .venv (`make venv`), into .whl/ (git-ignored; emptied first: the
# install there takes one version of each):
#   bash tests/gpu/wheels.sh [PYTHON_VERSION]        # default 3.12, the target's CPython
# There, before tests/gpu/measure.sh:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/../.."
target=${1:-3.12}
venv=.venv/bin/python
if ! [ -x "$venv" ]; then
    echo "wheels.sh: no .venv here (run \`make venv\` first): its versions are the ones fetched" >&2
    exit 1
fi
packages=(tensorly PyWavelets jsonschema jsonschema-specifications referencing rpds-py)
rm -rf .whl
mkdir .whl
for name in "${packages[@]}"; do
    version=$("$venv" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')
    if [ -z "$version" ]; then
        echo "wheels.sh: $name is not installed in .venv" >&2
        exit 1
    fi
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$target" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 -d .whl "$name==$version" 2>&1 | grep -v "is ignored" || true
    if ! ls .whl | grep -qi "^$(echo "$name" | tr - _)-$version-"; then
        echo "wheels.sh: no wheel of $name $version for CPython $target" >&2
        exit 1
    fi
done
ls .whl
