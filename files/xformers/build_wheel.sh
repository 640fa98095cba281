#!/usr/bin/env bash
# Build an xformers wheel from a verified sdist plus a patch series, prove its sm code and write a manifest.
# Runs as the unprivileged build user on a host (and in CI, unchanged). Finished means OUT_DIR/manifest.json
# exists: it is moved into place last, after the wheel. A killed build leaves no manifest, and the next run removes
# whatever it left (work directory, wheel) and starts over.
#
# Exit codes: 0 built or already up to date, 2 bad arguments or missing tool, 3 sdist sha256 mismatch,
# 4 a patch does not apply, 5 the build failed, 6 the wheel lacks a cubin for a requested arch,
# 7 another build holds OUT_DIR's lock.
# --unpack-only stops after the patches, leaving the patched tree in OUT_DIR/src (for tests and inspection).
set -u

usage() {
    cat <<'EOF'
usage: build_wheel.sh --sdist PATH --sha256 HEX --patch-dir DIR --arch-list '12.0[;9.0...]' --max-jobs N
                      --python VENV/bin/python --cuda-home DIR --out-dir DIR --fingerprint FP
                      [--ccache 0|1] [--cubins PATH/cubins.py] [--cuobjdump PATH]
       build_wheel.sh --unpack-only --sdist PATH --sha256 HEX --patch-dir DIR --out-dir DIR
Writes OUT_DIR/<wheel>.whl, OUT_DIR/manifest.json and the whole log OUT_DIR/build.log.
EOF
}

LOG=
die() {
    code=$1; shift
    echo "build_wheel: $*" >&2
    [ -z "$LOG" ] || echo "build_wheel: $*" >>"$LOG"
    exit "$code"
}

SDIST= SHA256= PATCH_DIR= ARCH_LIST= MAX_JOBS= PYTHON= CUDA_HOME_ARG= OUT_DIR= FINGERPRINT= CCACHE=0 CUBINS= CUOBJDUMP=
UNPACK_ONLY=0
while [ $# -gt 0 ]; do
    [ "$1" = --unpack-only ] && { UNPACK_ONLY=1; shift; continue; }
    [ $# -ge 2 ] || { usage >&2; die 2 "option $1 needs a value"; }
    case "$1" in
        --sdist) SDIST=$2 ;;
        --sha256) SHA256=$2 ;;
        --patch-dir) PATCH_DIR=$2 ;;
        --arch-list) ARCH_LIST=$2 ;;
        --max-jobs) MAX_JOBS=$2 ;;
        --python) PYTHON=$2 ;;
        --cuda-home) CUDA_HOME_ARG=$2 ;;
        --out-dir) OUT_DIR=$2 ;;
        --fingerprint) FINGERPRINT=$2 ;;
        --ccache) CCACHE=$2 ;;
        --cubins) CUBINS=$2 ;;
        --cuobjdump) CUOBJDUMP=$2 ;;
        *) usage >&2; die 2 "unknown option $1" ;;
    esac
    shift 2
done

required=("--sdist:$SDIST" "--sha256:$SHA256" "--patch-dir:$PATCH_DIR" "--out-dir:$OUT_DIR")
[ "$UNPACK_ONLY" = 1 ] || required+=("--arch-list:$ARCH_LIST" "--max-jobs:$MAX_JOBS" "--python:$PYTHON"
                                     "--cuda-home:$CUDA_HOME_ARG" "--fingerprint:$FINGERPRINT")
for pair in "${required[@]}"; do
    [ -n "${pair#*:}" ] || { usage >&2; die 2 "${pair%%:*} is required"; }
done
[ -f "$SDIST" ] || die 2 "sdist $SDIST does not exist"
[ -f "$PATCH_DIR/series" ] || die 2 "patch series $PATCH_DIR/series does not exist"
# Absolute paths: the patch and build steps run from inside the unpacked source.
abspath() { (cd "$(dirname "$1")" && echo "$(pwd)/$(basename "$1")"); }
SDIST=$(abspath "$SDIST") PATCH_DIR=$(cd "$PATCH_DIR" && pwd)
if [ "$UNPACK_ONLY" = 0 ]; then
    case "$MAX_JOBS" in ''|*[!0-9]*|0) die 2 "--max-jobs must be a positive integer, got '$MAX_JOBS'" ;; esac
    case "$CCACHE" in 0|1) ;; *) die 2 "--ccache must be 0 or 1, got '$CCACHE'" ;; esac
    [ -x "$PYTHON" ] || die 2 "python $PYTHON is not executable (set --python to the build venv's bin/python)"
    PYTHON=$(abspath "$PYTHON")
    NVCC="$CUDA_HOME_ARG/bin/nvcc"
    [ -x "$NVCC" ] || die 2 "no nvcc at $NVCC (set --cuda-home to the CUDA toolkit, e.g. /usr/local/cuda-12.8)"
    VENV_BIN=$(dirname "$PYTHON")
    # cubins.py lies beside this script, in the repository (files/xformers/) and on a host alike.
    [ -n "$CUBINS" ] || CUBINS="$(cd "$(dirname "$0")" && pwd)/cubins.py"
    [ -f "$CUBINS" ] || die 2 "cubin reader cubins.py not found (pass --cubins PATH)"
    CUBINS=$(abspath "$CUBINS")
    [ -z "$CUOBJDUMP" ] || [ -x "$CUOBJDUMP" ] || die 2 "--cuobjdump $CUOBJDUMP is not executable"
    [ -n "$CUOBJDUMP" ] || [ ! -x "$CUDA_HOME_ARG/bin/cuobjdump" ] || CUOBJDUMP="$CUDA_HOME_ARG/bin/cuobjdump"
    [ -n "$CUOBJDUMP" ] || CUOBJDUMP=$(command -v cuobjdump || true)
fi

for tool in tar patch sha256sum; do
    command -v "$tool" >/dev/null 2>&1 || die 2 "$tool is not installed (apt-get install $tool)"
done
[ "$UNPACK_ONLY" = 1 ] || command -v c++ >/dev/null 2>&1 || die 2 "no C++ compiler (apt-get install build-essential)"

mkdir -p "$OUT_DIR" || die 2 "cannot create $OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
MANIFEST="$OUT_DIR/manifest.json"
BUILD_LOG="$OUT_DIR/build.log"

if command -v flock >/dev/null 2>&1; then
    exec 9>"$OUT_DIR/.lock"
    flock -n 9 || die 7 "another build is running in $OUT_DIR (lock $OUT_DIR/.lock)"
fi

# Up to date: a finished manifest for this fingerprint whose wheel is still there, unchanged.
if [ "$UNPACK_ONLY" = 0 ] && [ -f "$MANIFEST" ] && "$PYTHON" - "$MANIFEST" "$FINGERPRINT" <<'EOF'
import hashlib, json, os, sys
m = json.load(open(sys.argv[1]))
wheel = os.path.join(os.path.dirname(sys.argv[1]), m["wheel"])
ok = m.get("fingerprint") == sys.argv[2] and os.path.isfile(wheel) \
    and hashlib.sha256(open(wheel, "rb").read()).hexdigest() == m["wheel_sha256"]
sys.exit(0 if ok else 1)
EOF
then
    echo "build_wheel: up to date: $(sed -n 's/.*"wheel": "\([^"]*\)".*/\1/p' "$MANIFEST") (fingerprint $FINGERPRINT)"
    exit 0
fi

# Anything left from another fingerprint or a killed run must not look finished.
rm -rf "$OUT_DIR"/.build.* "$OUT_DIR/src"
[ "$UNPACK_ONLY" = 1 ] || rm -f "$MANIFEST" "$OUT_DIR"/xformers-*.whl
WORK=$(mktemp -d "$OUT_DIR/.build.XXXXXX") || die 2 "cannot create a build directory in $OUT_DIR"
trap 'rm -rf "$WORK"' EXIT
: >"$BUILD_LOG" && LOG=$BUILD_LOG
log() { echo "build_wheel: $*" | tee -a "$LOG"; }

actual=$(sha256sum "$SDIST" | cut -d' ' -f1)
[ "$actual" = "$SHA256" ] || die 3 "sdist $SDIST has sha256 $actual, expected $SHA256 (re-download it or fix xformers_source_sha256)"
log "sdist $SDIST sha256 ok"

mkdir "$WORK/src" && tar -xzf "$SDIST" -C "$WORK/src" || die 2 "cannot unpack $SDIST"
set -- "$WORK"/src/*/
[ $# -eq 1 ] && [ -f "$1/setup.py" ] || die 2 "$SDIST does not unpack to one source directory with setup.py"
SRC=${1%/}

while read -r line || [ -n "$line" ]; do
    name=${line%%#*}; name=$(echo "$name" | tr -d '[:space:]')
    [ -n "$name" ] || continue
    p="$PATCH_DIR/$name"
    [ -f "$p" ] || die 4 "patch $name listed in $PATCH_DIR/series does not exist"
    if out=$(cd "$SRC" && patch -p1 --forward --dry-run --batch <"$p" 2>&1); then
        (cd "$SRC" && patch -p1 --forward --batch <"$p") >>"$LOG" 2>&1 || die 4 "patch $name failed to apply after a clean dry run"
        log "applied $name"
    elif (cd "$SRC" && patch -p1 --reverse --dry-run --batch <"$p") >/dev/null 2>&1; then
        log "$name is already applied"
    else
        echo "$out" >>"$LOG"
        die 4 "patch $name does not apply to $(basename "$SDIST"): $out"
    fi
done <"$PATCH_DIR/series"
if [ "$UNPACK_ONLY" = 1 ]; then
    mv "$WORK/src" "$OUT_DIR/src" || die 2 "cannot move the patched source to $OUT_DIR/src"
    log "patched source: $OUT_DIR/src/$(basename "$SRC")"
    exit 0
fi

export TORCH_CUDA_ARCH_LIST="$ARCH_LIST" MAX_JOBS XFORMERS_BUILD_TYPE=Release FORCE_CUDA=1
export CUDA_HOME="$CUDA_HOME_ARG" PATH="$VENV_BIN:$CUDA_HOME_ARG/bin:$PATH"
command -v ninja >/dev/null 2>&1 || die 2 "ninja not found in $VENV_BIN or PATH (pip install ninja into the build venv)"
if [ "$CCACHE" = 0 ]; then
    # torch >= 2.14 puts ccache/sccache in front of the compilers by itself whenever one is on PATH.
    export TORCH_NO_COMPILER_WRAPPER=1
else
    command -v ccache >/dev/null 2>&1 || die 2 "--ccache 1 but ccache is not installed"
    export PYTORCH_NVCC="ccache $NVCC"
    # Every build unpacks into a new directory: hash paths relative to it, or no rebuild would ever hit.
    export CCACHE_BASEDIR="${CCACHE_BASEDIR:-$WORK}" CCACHE_NOHASHDIR="${CCACHE_NOHASHDIR:-1}"
    [ -d /usr/lib/ccache ] && export PATH="/usr/lib/ccache:$PATH"
fi
{
    echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS CUDA_HOME=$CUDA_HOME ccache=$CCACHE"
    "$NVCC" --version | tail -n 1
    "$PYTHON" -W ignore -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)'
} >>"$LOG" 2>&1 || die 2 "the build venv cannot import torch (see $LOG)"
"$PYTHON" -c 'import setuptools, wheel' 2>/dev/null || die 2 "the build venv lacks setuptools or wheel (pip install setuptools wheel)"

log "building xformers for $ARCH_LIST with $MAX_JOBS jobs; full log: $LOG"
start=$(date +%s)
(cd "$SRC" && "$PYTHON" -m pip wheel --no-build-isolation --no-deps --no-cache-dir -v -w "$WORK/dist" .) 2>&1 \
    | tee -a "$LOG" \
    | sed -un -E 's/^ *(\[[0-9]+\/[0-9]+\]) .* -c [^ ]*\/src\/[^/]+\/([^ ]+) .*/\1 \2/p; t; s/^ *(\[[0-9]+\/[0-9]+\] .{0,100}).*/\1/p'
status=${PIPESTATUS[0]}
seconds=$(( $(date +%s) - start ))
if [ "$status" -ne 0 ]; then
    {
        echo "build_wheel: build failed after ${seconds}s (exit $status); first errors in $LOG:"
        # The compiler's own message sits far above pip's closing traceback: show both.
        grep -n -A 3 -E '^ *FAILED: |[Ee]rror:|fatal' "$LOG" | grep -v 'UserWarning' | head -n 40
        echo "build_wheel: last lines of $LOG:"
        tail -n 25 "$LOG"
    } >&2
    exit 5
fi
set -- "$WORK"/dist/xformers-*.whl
[ $# -eq 1 ] && [ -f "$1" ] || die 5 "pip wheel succeeded but left no single xformers wheel in $WORK/dist"
WHEEL=$1
log "built $(basename "$WHEEL") in ${seconds}s"

"$PYTHON" -c 'import sys, zipfile; open(sys.argv[2], "wb").write(zipfile.ZipFile(sys.argv[1]).read("xformers/_C.so"))' \
    "$WHEEL" "$WORK/_C.so" || die 6 "$(basename "$WHEEL") has no xformers/_C.so"
reader=(--no-cuobjdump)
[ -z "$CUOBJDUMP" ] || reader=(--cuobjdump "$CUOBJDUMP")
if proof=$("$PYTHON" "$CUBINS" --require "$ARCH_LIST" "${reader[@]}" "$WORK/_C.so" 2>>"$LOG"); then
    log "cubins: $proof"
else
    echo "$proof" >>"$LOG"
    die 6 "$(basename "$WHEEL") lacks cubins for a requested arch: $proof"
fi

export MF_FINGERPRINT="$FINGERPRINT" MF_WHEEL=$(basename "$WHEEL") MF_WHEEL_SHA256=$(sha256sum "$WHEEL" | cut -d' ' -f1) \
    MF_SDIST=$(basename "$SDIST") MF_SDIST_SHA256="$SHA256" MF_SERIES="$PATCH_DIR/series" MF_ARCH_LIST="$ARCH_LIST" \
    MF_MAX_JOBS="$MAX_JOBS" MF_CCACHE="$CCACHE" MF_CUDA_HOME="$CUDA_HOME_ARG" MF_NVCC=$("$NVCC" --version | tail -n 1) \
    MF_PROOF="$proof" MF_SECONDS="$seconds"
"$PYTHON" -W ignore - "$WORK/manifest.json" <<'EOF' || die 2 "cannot write the manifest"
import json, os, sys
import torch
e = os.environ
proof = json.loads(e["MF_PROOF"])
patches = [line.split("#", 1)[0].strip() for line in open(e["MF_SERIES"])]
manifest = {
    "fingerprint": e["MF_FINGERPRINT"],
    "wheel": e["MF_WHEEL"],
    "wheel_sha256": e["MF_WHEEL_SHA256"],
    "inputs": {
        "sdist": e["MF_SDIST"], "sdist_sha256": e["MF_SDIST_SHA256"], "patches": [p for p in patches if p],
        "arch_list": e["MF_ARCH_LIST"], "max_jobs": int(e["MF_MAX_JOBS"]), "ccache": e["MF_CCACHE"] == "1",
        "cuda_home": e["MF_CUDA_HOME"], "nvcc": e["MF_NVCC"], "python": sys.version.split()[0],
        "torch": torch.__version__, "torch_cuda": torch.version.cuda,
    },
    "cubin_archs": proof["cubins"], "ptx_archs": proof["ptx"], "cubin_reader": proof["reader"],
    "build_seconds": int(e["MF_SECONDS"]),
}
with open(sys.argv[1], "w") as handle:
    json.dump(manifest, handle, indent=2)
EOF
mv "$WHEEL" "$OUT_DIR/" && mv "$WORK/manifest.json" "$MANIFEST" || die 2 "cannot move the wheel and manifest into $OUT_DIR"
log "done: $OUT_DIR/$(basename "$WHEEL") (manifest $MANIFEST)"
