#!/usr/bin/env bash
# Several machines: run this on every node with the same CONFIG, NNODES and rendezvous endpoint.
# RDZV is host:port on node 0 (its address on the network that joins the nodes); torchrun's c10d
# rendezvous assigns ranks. The run directory (run.out_dir) should be on a shared filesystem: each
# rank writes its checkpoint shard there and rank 0 completes it.
#   NNODES=2 NPROC=4 RDZV=10.0.0.1:29400 NODE_RANK=0 NODE_ADDR=10.0.0.1 launch/torchrun_multi_node.sh CONFIG
#   NNODES=2 NPROC=4 RDZV=10.0.0.1:29400 NODE_RANK=1 NODE_ADDR=10.0.0.2 launch/torchrun_multi_node.sh CONFIG
# NODE_ADDR: this node's own address on that network. torchrun otherwise takes the address the
#   machine's hostname resolves to, both to decide whether it hosts the rendezvous store and to
#   advertise to the workers: on a cluster whose nodes talk over a second interface (InfiniBand,
#   a private network) that address is the wrong one and the rendezvous fails.
# NODE_RANK: 0 on the node that hosts the rendezvous store (RDZV's host), 1, 2, ... elsewhere.
# Backend: gloo on CPU, nccl when run.device is cuda; set GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME
# to the interface of NODE_ADDR.
set -euo pipefail
# A fresh rendezvous store for every restart attempt: torchrun otherwise keeps one store across
# attempts, and the next attempt could read the failed attempt's (dead) worker addresses.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
config=${1:?usage: NNODES=.. NPROC=.. RDZV=host:port [NODE_RANK=.. NODE_ADDR=..] $0 CONFIG [dhdnn train flags...]}
shift
extra=()
if [ -n "${NODE_ADDR:-}" ]; then extra+=(--local-addr "$NODE_ADDR"); fi
if [ -n "${NODE_RANK:-}" ]; then
    extra+=(--node-rank "$NODE_RANK" --rdzv-conf "is_host=$([ "$NODE_RANK" = 0 ] && echo 1 || echo 0)")
fi
exec torchrun --nnodes "${NNODES:?set NNODES}" --nproc-per-node "${NPROC:?set NPROC}" \
    --rdzv-backend c10d --rdzv-endpoint "${RDZV:?set RDZV=host:port}" --rdzv-id "${RDZV_ID:-dhdnn}" \
    --max-restarts "${MAX_RESTARTS:-0}" "${extra[@]}" \
    -m dhdnn train "$config" --auto-resume "$@"
