#!/usr/bin/env bash
# The whole deploy on a real NVIDIA host, twice, then the fleet report.
#   scripts/gpu-e2e.sh MIRROR_FILES [OUT_DIR]
# MIRROR_FILES holds what the host cannot download (the xformers sdist, any wheels pip needs); they are laid
# out as the local mirror /srv/gpufleet-mirror that inventory/examples/preprovisioned.yaml points at.
# Each run's --json goes to OUT_DIR/runN.json (stderr to runN.log) with a per-host change summary.
set -euo pipefail
files=${1:?usage: scripts/gpu-e2e.sh MIRROR_FILES [OUT_DIR]}
out=${2:-e2e-out}
inventory=${GPUFLEET_INVENTORY:-inventory/examples/preprovisioned.yaml}
mirror=/srv/gpufleet-mirror
mkdir -p "$out" "$mirror/simple"
cp "$files"/*.tar.gz "$mirror/" 2>/dev/null || true
python3 -m gpufleet.mirror "$files" "$mirror/simple"

for run in 1 2; do
    start=$(date +%s)
    set +e
    GPUFLEET_INVENTORY=$inventory pyinfra -y --json inventory.py deploys/full.py >"$out/run$run.json" 2>"$out/run$run.log"
    rc=$?
    set -e
    echo "run $run: exit $rc in $(( $(date +%s) - start ))s"
    python3 -m gpufleet.cli run-summary "$out/run$run.json" | tee "$out/run$run.summary"
    [ "$rc" = 0 ] || { tail -n 40 "$out/run$run.log"; exit "$rc"; }
done
python3 -m gpufleet.cli report "$(python3 -c 'from gpufleet.settings import load_settings; print(load_settings()["report_dir"].default)')/latest"
