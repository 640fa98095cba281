#!/usr/bin/env bash
# Regenerates the fixtures: tiny libraries from nvcc (13.0 here) and cuobjdump's listings of them (13.5 from PyPI).
# usage: make_fixtures.sh NVCC CUOBJDUMP
set -eu
nvcc=$1 cuobjdump=$2
cd "$(dirname "$0")"
build() { out=$1; shift; "$nvcc" -O2 -Xcompiler -fPIC -shared -cudart shared "$@" -o "$out.so" tiny.cu; }
build sm90_sm120 -gencode arch=compute_90,code=sm_90 -gencode arch=compute_120,code=sm_120
build sm90a_ptx120 -gencode arch=compute_90a,code=sm_90a -gencode arch=compute_120,code=compute_120
build compressed_sm100a_sm120 --compress-mode=size -gencode arch=compute_120,code=sm_120 -gencode arch=compute_100a,code=sm_100a
build sm120a_sm120f_sm100f -gencode arch=compute_120a,code=sm_120a -gencode arch=compute_120f,code=sm_120f \
    -gencode arch=compute_100f,code=sm_100f
for lib in *.so; do
    { "$cuobjdump" --list-elf "$lib"; "$cuobjdump" --list-ptx "$lib" 2>/dev/null || true; } >"${lib%.so}.cuobjdump.txt"
done
