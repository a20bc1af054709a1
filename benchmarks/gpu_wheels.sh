#!/usr/bin/env bash
# Pack what benchmarks/gpu.py needs beyond a bare CUDA PyTorch image (Python 3.12, no network) into one
# archive small enough to travel with the working tree: .whl/site312.tar.xz (~37 MB).
#   bash benchmarks/gpu_wheels.sh
# On the GPU machine, from the repository root:
#   mkdir -p /tmp/site && tar xJf .whl/site312.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD
#   python3 benchmarks/gpu.py --minutes 9
set -euo pipefail
cd "$(dirname "$0")/.."
dl=$(mktemp -d); site=$(mktemp -d)
plat="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $plat -d "$dl" \
  ray==2.60.0 optuna==5.0.0 transformer_lens==4.3.0 alembic sqlalchemy mako colorlog beartype fancy-einsum \
  typeguard datasets dill multiprocess pydantic==2.13.4 pydantic-core==2.46.4 annotated-types typing-inspection \
  jsonschema jsonschema-specifications referencing rpds-py
python3 -m pip install -q --no-deps --no-compile --target "$site" --python-version 3.12 --implementation cp \
  --only-binary=:all: $plat "$dl"/*.whl
# Ray's Java jar, RLlib, Serve, LLM and the dashboard's web build: unused here, and 40 MB of the 64 MiB limit
rm -rf "$site"/ray/{jars,rllib,serve,llm,dashboard/client/build} "$site"/bin
find "$site" -name __pycache__ -prune -exec rm -rf {} +
mkdir -p .whl && tar -C "$site" -cf - . | xz -T0 -6 > .whl/site312.tar.xz
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
ls -la .whl/site312.tar.xz
