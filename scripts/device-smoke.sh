#!/usr/bin/env bash
# Runs the smoke test on a GPU machine twice and reports on both:
#   1. the provisioned setup (the venv's torch + our xformers build): every rung should pass (exit 0);
#   2. the wrong setup (PyPI's xformers 0.0.35 wheel on PYTHONPATH beside the same torch): it must fail at
#      the xformers_cpp rung, since that wheel's C++ part does not load next to another torch (FACTS.md).
# then `gpufleet report` over both documents. Exits 0 only when both cases behave as expected.
#
#   scripts/device-smoke.sh --python /opt/gpufleet/venv/bin/python --wrong-wheel xformers-0.0.35-py39-none-manylinux_2_28_x86_64.whl \
#       [--out DIR (default $OUT)] [--report-python PY] [-- extra smoke args, e.g. --quick --heads 16]
# --wrong-wheel may be omitted where PyPI is reachable (pip then fetches xformers==0.0.35).
set -uo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
py="" wheel="" out="${OUT:-}" report_py=""
extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        --python) py="$2"; shift 2 ;;
        --wrong-wheel) wheel="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --report-python) report_py="$2"; shift 2 ;;
        --) shift; extra=("$@"); break ;;
        *) echo "device-smoke: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
    esac
done
[ -n "$py" ] && [ -x "$py" ] || { echo "device-smoke: --python must name the venv's python (got '${py}')" >&2; exit 2; }
[ -n "$out" ] || { echo "device-smoke: give --out DIR or set OUT" >&2; exit 2; }
docs="$out/smoke"
mkdir -p "$docs"
host="$(hostname -s 2>/dev/null || hostname)"
smoke="$repo/files/smoke/gpufleet_smoke.py"
verdict=0

echo "== 1. provisioned setup: $py"
"$py" "$smoke" --host-label "$host" --output "$docs/$host.json" "${extra[@]}" 2> "$out/smoke-$host.log"
good_rc=$?
tail -n 12 "$out/smoke-$host.log"
echo "exit code $good_rc (expected 0)"
[ "$good_rc" -eq 0 ] || verdict=1

echo "== 2. wrong setup: PyPI xformers 0.0.35 wheel on PYTHONPATH"
target="$(mktemp -d)/pypi-xformers"
if [ -n "$wheel" ]; then
    "$py" -m pip install --quiet --no-deps --target "$target" "$wheel"
else
    "$py" -m pip install --quiet --no-deps --target "$target" "xformers==0.0.35"
fi
install_rc=$?
if [ "$install_rc" -ne 0 ]; then
    echo "device-smoke: could not install the PyPI xformers wheel into $target (pass --wrong-wheel FILE offline)" >&2
    verdict=1
else
    PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}" "$py" "$smoke" --host-label "$host-pypi-xformers" \
        --output "$docs/$host-pypi-xformers.json" "${extra[@]}" 2> "$out/smoke-$host-pypi-xformers.log"
    wrong_rc=$?
    tail -n 6 "$out/smoke-$host-pypi-xformers.log"
    # The wrong setup must fail, at xformers_cpp, with the PyPI copy (not the venv's build) being the one loaded.
    "$py" - "$docs/$host-pypi-xformers.json" "$target" "$wrong_rc" <<'PY'
import json, sys
doc = json.load(open(sys.argv[1]))
rung = next(r for r in doc["rungs"] if r["id"] == "xformers_cpp")
loaded = rung["details"].get("xformers_file", "")
ok = sys.argv[3] == "1" and doc["failed_rung"] == "xformers_cpp" and loaded.startswith(sys.argv[2])
print(f"exit code {sys.argv[3]}, failed rung {doc['failed_rung']!r} (expected 1, 'xformers_cpp'); xformers from {loaded}")
print(f"message: {doc['message']}")
sys.exit(0 if ok else 1)
PY
    [ $? -eq 0 ] || verdict=1
fi

echo "== 3. gpufleet report $docs"
if [ -z "$report_py" ]; then
    # The report wants rich; a bare GPU venv lacks it and then prints the Markdown instead.
    report_py="$py"
    command -v python3 >/dev/null && python3 -c "import rich" 2>/dev/null && report_py="python3"
fi
COLUMNS="${COLUMNS:-200}" PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" "$report_py" -m gpufleet.cli report "$docs"
report_rc=$?
echo "report exit code $report_rc (expected 1: the wrong-setup host failed)"
[ "$report_rc" -eq 1 ] || verdict=1

echo "== device-smoke: $([ "$verdict" -eq 0 ] && echo PASSED || echo FAILED); documents and logs in $out"
exit "$verdict"
