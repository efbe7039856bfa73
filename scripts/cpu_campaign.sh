#!/usr/bin/env bash
# The CPU track's campaign (experiments/cpu.toml), in priority order: each step is one `sweep --resume --only`,
# so an interrupted campaign continues where it stopped (a finished cell is skipped, an interrupted one resumes
# from its last checkpoint). Usage: scripts/cpu_campaign.sh DATA_DIR [RUNS_DIR [OCCLUSION_DIR]]
set -u
DATA=${1:?usage: scripts/cpu_campaign.sh DATA_DIR [RUNS_DIR]}
RUNS=${2:-results/cpu/runs}
OCC=${3:-$(dirname "$RUNS")/occlusion}
for pattern in \
    'vnet-L8-s1337-*' 'dtc-L8-s1337-*' 'uamt-L8-s1337-*' 'sassnet-L8-s1337-*' 'bcp-L8-s1337-*' 'omf-L8-s1337-*' \
    'ssnet-L8-s1337-*' \
    'vnet-L16-s1337-*' 'dtc-L16-s1337-*' 'uamt-L16-s1337-*' 'sassnet-L16-s1337-*' 'bcp-L16-s1337-*' \
    'omf-L16-s1337-*' 'ssnet-L16-s1337-*' 'vnet-L80-*' \
    'omf-s1-*L8-s1337-*' \
    'vnet-L8-*' 'uamt-L8-*' 'bcp-L8-*' 'omf-L8-*' \
    '*'; do
  echo "== $(date -u +%FT%TZ) sweep cpu --only '$pattern'"
  ssl-bench sweep cpu --data "$DATA" --runs-dir "$RUNS" --cpus-per-trial 2 --max-concurrent 1 --resume \
    --only "$pattern" || echo "== sweep for '$pattern' exited $?"
  # Fig. 3 on every finished cell while its weights are here (records only are committed): one occlusion
  # folder per run under results/cpu/occlusion/, which `ssl-bench report cpu` reads together
  for run in "$RUNS"/*/; do
    run=${run%/}; cell=$(basename "$run")
    [ -f "$run/summary.json" ] && [ ! -f "$OCC/$cell/occlusion_per_case.csv" ] || continue
    echo "== $(date -u +%FT%TZ) occlusion $cell"
    ssl-bench occlusion "$run" --variant volume --ratios 0,0.1,0.2,0.3,0.4,0.5 --repeats 3 --no-panel --quiet \
      --data "$DATA" --out "$OCC/$cell" --overwrite || echo "== occlusion of $cell exited $?"
  done
done
echo "== $(date -u +%FT%TZ) campaign done"
