#!/usr/bin/env bash
# One machine, N worker processes under torchrun (same result as `dhdnn train CONFIG --workers N`).
#   launch/torchrun_single_node.sh launch/ring8_swiss_roll.yaml 4 [extra dhdnn flags...]
set -euo pipefail
config=${1:?usage: $0 CONFIG NPROC [dhdnn train flags...]}
nproc=${2:?usage: $0 CONFIG NPROC [dhdnn train flags...]}
shift 2
exec torchrun --standalone --nproc-per-node "$nproc" -m dhdnn train "$config" "$@"
