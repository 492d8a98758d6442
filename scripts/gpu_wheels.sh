#!/usr/bin/env bash
# Wheels for `serve` on a GPU machine that has a CUDA torch but not nanoseek's HTTP packages, and no network:
# fastapi, pydantic and uvicorn with what they need, for CPython 3.12 on x86-64 Linux (the GPU image's Python,
# docs/gpu.md). Run it where pip reaches the package index; scripts/gpu_check.sh installs .whl/ into /tmp/site.
#
#   scripts/gpu_wheels.sh [DIR]          # default DIR: .whl (add /.whl/ to .git/info/exclude)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.whl}
mkdir -p "$dir"
plat=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    plat+=(--platform "$p")
done
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" -d "$dir" \
    "fastapi>=0.115" "pydantic>=2,<3" "uvicorn>=0.30" httptools
# what the GPU image already holds (KINDS.md's package list): its own versions stay in charge
for have in anyio typing_extensions h11 click idna sniffio annotated_doc zipp; do
    rm -f "$dir"/"$have"-*.whl
done
ls "$dir"
