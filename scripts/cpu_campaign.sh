#!/usr/bin/env bash
# The CPU track's campaign (experiments/cpu.toml), in priority order: each step is one `sweep --resume --only`,
# so an interrupted campaign continues where it stopped (a finished cell is skipped, an interrupted one resumes
# from its last checkpoint). Usage: scripts/cpu_campaign.sh DATA_DIR [RUNS_DIR]
set -u
DATA=${1:?usage: scripts/cpu_campaign.sh DATA_DIR [RUNS_DIR]}
RUNS=${2:-results/cpu/runs}
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
done
echo "== $(date -u +%FT%TZ) campaign done"
