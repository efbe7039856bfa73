#!/usr/bin/env bash
# One GPU session's work for issue 6 (speed, then real paper-schedule runs), run on the device machine.
#
# Before it: stage the data with `../shared/tools/device-stage pack ../shared/data/LA` and make the
# calls it prints (the machine keeps /tmp only while warm). Then, in the final call:
#   <the unpack line device-stage prints> && bash scripts/device_session.sh
# Every record is packed into $OUT/records.tar.gz (the device tool brings back only a few files):
# bench JSON, run records without checkpoints (these stay on the device), and provenance. Checked on CPU with
#   DEVICE=cpu PROFILE=smoke SSL_BENCH_DATA=../shared/data/LA OUT=/tmp/o bash scripts/device_session.sh
# Settings (environment): SSL_BENCH_DATA (default /tmp/stage/root/LA), DEVICE (cuda), PROFILE (paper),
# BENCH_METHODS, RUN_METHODS (in issue 6's order), LABELED (8), SEED (1337), BUDGET_S (time after which no
# new run is started).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # the device has no network: no pip install of the project
DATA=${SSL_BENCH_DATA:-/tmp/stage/root/LA}
DEVICE=${DEVICE:-cuda}
PROFILE=${PROFILE:-paper}
OUT=${OUT:?set OUT to the folder whose files come back}
REC=/tmp/ssl-bench-records
BENCH_METHODS=${BENCH_METHODS:-"vnet uamt dtc sassnet bcp omf ssnet"}
RUN_METHODS=${RUN_METHODS:-"vnet uamt dtc sassnet bcp omf ssnet"}
LABELED=${LABELED:-8}
SEED=${SEED:-1337}
BUDGET_S=${BUDGET_S:-420}
RUNS=/tmp/ssl-bench-runs
start=$(date +%s)
bench() { python -m ssl_bench.cli "$@"; }

rm -rf "$REC" && mkdir -p "$REC/bench" "$REC/runs" "$RUNS" "$OUT"
pack() { tar czf "$OUT/records.tar.gz" -C "$REC" .; }
trap pack EXIT  # whatever was measured comes back, even after a failure or the time limit
{ date -u +%FT%TZ; git rev-parse HEAD 2>/dev/null || echo "no git"; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU";
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } > "$REC/provenance.txt"

for m in $BENCH_METHODS; do
  bench bench --method "$m" --data "$DATA" --device "$DEVICE" --profile "$PROFILE" --out "$REC/bench/$m.json" \
    ${BENCH_ITERATIONS:+--iterations $BENCH_ITERATIONS} ${BENCH_EVAL_CASES:+--eval-cases $BENCH_EVAL_CASES}
done

for m in $RUN_METHODS; do
  if (( $(date +%s) - start > BUDGET_S )); then echo "budget reached: not starting $m" | tee -a "$REC/provenance.txt"; break; fi
  run="$RUNS/$m-L$LABELED-s$SEED-honest"
  resume=$([ -f "$run/config.json" ] && echo --resume || true)
  bench run --method "$m" --labeled "$LABELED" --seed "$SEED" --data "$DATA" --device "$DEVICE" --profile "$PROFILE" \
    --out "$run" --quiet $resume ${RUN_ITERATIONS:+--iterations $RUN_ITERATIONS}
  mkdir -p "$REC/runs/$(basename "$run")"
  cp "$run"/{config.json,summary.json,metrics_per_case.csv,log.jsonl} "$REC/runs/$(basename "$run")/"
done
echo "done in $(( $(date +%s) - start )) s" | tee -a "$REC/provenance.txt"
