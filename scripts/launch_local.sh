#!/usr/bin/env bash
# Start N local processes of one multi-process training run, joined by jax.distributed on
# 127.0.0.1, each with D fake CPU devices (gloo collectives). For testing multi-host code paths on
# one machine; the same trainer runs unchanged on a pod slice.
#   scripts/launch_local.sh N D CONFIG [section.key=value ...]
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS CONFIG [overrides...]" >&2
  exit 2
fi
n=$1; d=$2; shift 2
port=${FLAX_GPT_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}
pids=()
for ((i = 0; i < n; i++)); do
  JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$d" \
    flax-gpt train "$@" --coordinator "127.0.0.1:$port" --num-processes "$n" --process-id "$i" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
