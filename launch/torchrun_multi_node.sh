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
# RDZV_READ_TIMEOUT: seconds an agent waits on the rendezvous store (torch's default 60): with the
#   link to node 0 cut, an agent gives up after this long (and the run's processes end).
extra=()
conf="read_timeout=${RDZV_READ_TIMEOUT:-60}"
if [ -n "${NODE_ADDR:-}" ]; then extra+=(--local-addr "$NODE_ADDR"); fi
if [ -n "${NODE_RANK:-}" ]; then conf+=",is_host=$([ "$NODE_RANK" = 0 ] && echo 1 || echo 0)"; fi  # (c10d assigns ranks)
torchrun --nnodes "${NNODES:?set NNODES}" --nproc-per-node "${NPROC:?set NPROC}" \
    --rdzv-backend c10d --rdzv-endpoint "${RDZV:?set RDZV=host:port}" --rdzv-id "${RDZV_ID:-dhdnn}" \
    --rdzv-conf "$conf" --max-restarts "${MAX_RESTARTS:-0}" "${extra[@]}" \
    -m dhdnn train "$config" --auto-resume "$@" &
agent=$!
trap 'kill -TERM "$agent" 2>/dev/null; wait "$agent"; exit 143' TERM
trap 'kill -INT "$agent" 2>/dev/null; wait "$agent"; exit 130' INT
trap 'kill -HUP "$agent" 2>/dev/null; wait "$agent"; exit 129' HUP
# AGENT_IDLE_S: an agent whose workers are gone and that starts none for this long is stopped. A
#   worker fails within run.timeout_s of losing a peer; an agent cut off from the rendezvous store
#   (a cut link to node 0) can block in a store call for as long as TCP keeps retrying (minutes).
idle=0 started=0
while kill -0 "$agent" 2>/dev/null; do
    # (workers that died stay zombies while the agent is blocked: only live ones count)
    if ps --ppid "$agent" -o stat= | grep -qv '^Z'; then idle=0 started=1; elif [ "$started" = 1 ]; then
        idle=$((idle + 1))
    fi
    if [ "$idle" -ge "${AGENT_IDLE_S:-60}" ]; then
        echo "torchrun_multi_node: torchrun had no workers for ${AGENT_IDLE_S:-60} s (rendezvous store at $RDZV" \
             "unreachable?); stopping it" >&2
        kill -KILL "$agent" 2>/dev/null
        wait "$agent" 2>/dev/null || true
        exit 1
    fi
    sleep 1
done
wait "$agent"
