#!/usr/bin/env bash
# Thin wrapper: the GPU session's work is scripts/device_session.py (python3; see its docstring for the
# steps, the staging with ../shared/tools/device-stage and the CPU dry run). Arguments and the environment
# (OUT, SSL_BENCH_DATA, SSL_BENCH_WHEELS, SSL_BENCH_COMMIT, BUDGET_S, DEVICE, PROFILE) pass through.
exec python3 "$(dirname "$0")/device_session.py" "$@"
