#!/usr/bin/env bash
# Several machines: run this on every node with the same CONFIG, NNODES and rendezvous endpoint.
# The rendezvous host is any one of the nodes (its address must be reachable from the others);
# torchrun's c10d rendezvous assigns ranks. The run directory (run.out_dir) should be on a
# shared filesystem: each rank writes its checkpoint shard there and rank 0 completes it.
#   NNODES=2 NPROC=4 RDZV=node0.example:29400 launch/torchrun_multi_node.sh launch/ring8_swiss_roll.yaml
# Backend: gloo on CPU, nccl when run.device is cuda (set GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME
# to the interface that connects the nodes if the default one is wrong).
set -euo pipefail
# A fresh rendezvous store for every restart attempt: torchrun otherwise keeps one store across
# attempts, and the next attempt could read the failed attempt's (dead) worker addresses.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
config=${1:?usage: NNODES=.. NPROC=.. RDZV=host:port $0 CONFIG [dhdnn train flags...]}
shift
exec torchrun --nnodes "${NNODES:?set NNODES}" --nproc-per-node "${NPROC:?set NPROC}" \
    --rdzv-backend c10d --rdzv-endpoint "${RDZV:?set RDZV=host:port}" --rdzv-id "${RDZV_ID:-dhdnn}" \
    --max-restarts "${MAX_RESTARTS:-0}" \
    -m dhdnn train "$config" --auto-resume "$@"
