#!/usr/bin/env bash
# Multi-node training without SLURM: start torchrun on every host of a hostfile, which starts one process per
# device there; Lightning picks the ranks up from torchrun (DDP or DeepSpeed alike).
#
#   recipes/multinode/launch.sh recipes/multinode/hostfile fit \
#       --config configs/experiment/gpt2-small-fineweb.yaml --trainer configs/strategy/deepspeed_zero2.yaml
#
# The hostfile has DeepSpeed's format, one node per line: `<host> slots=<devices>`; every node needs the same
# slot count, and the first host is the rendezvous master. Remote hosts are reached with passwordless ssh and
# must see this folder at the same path with the same environment; `localhost` lines start on this machine
# (that is how the tests run two "nodes" on one). trainer.num_nodes and trainer.devices are set from the
# hostfile. Environment: MASTER_PORT (default 29500), MASTER_ADDR (default: the first host).
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 <hostfile> fit|validate [freeatten arguments...]" >&2
    exit 2
fi
hostfile=$1
shift
nodes=$(awk '!/^[[:space:]]*(#|$)/' "$hostfile")
if [ -z "$nodes" ]; then
    echo "error: no hosts in $hostfile (one '<host> slots=<devices>' line per node)" >&2
    exit 2
fi
mapfile -t hosts < <(awk '{print $1}' <<<"$nodes")
mapfile -t slots < <(awk '{n = 1; for (i = 2; i <= NF; i++) if ($i ~ /^slots=/) n = substr($i, 7); print n}' <<<"$nodes")
for count in "${slots[@]}"; do
    if [ "$count" != "${slots[0]}" ]; then
        echo "error: every node needs the same slots= count (devices per node), got: ${slots[*]}" >&2
        exit 2
    fi
done
nnodes=${#hosts[@]}
first=${hosts[0]}
[ "$first" = localhost ] && first=127.0.0.1
master_addr=${MASTER_ADDR:-$first}
master_port=${MASTER_PORT:-29500}
if ! freeatten_path=$(command -v freeatten); then
    echo "error: freeatten is not on PATH: activate the environment first (. .venv/bin/activate)" >&2
    exit 2
fi
bin_dir=$(dirname "$freeatten_path")
echo "$nnodes node(s) x ${slots[0]} process(es); rendezvous at $master_addr:$master_port"

pids=()
for rank in "${!hosts[@]}"; do
    command=("$bin_dir/torchrun" --nnodes "$nnodes" --nproc-per-node "${slots[0]}" --node-rank "$rank"
        --master-addr "$master_addr" --master-port "$master_port"
        "$bin_dir/freeatten" "$@" --trainer.num_nodes "$nnodes" --trainer.devices "${slots[0]}")
    case ${hosts[$rank]} in
        localhost | 127.0.0.1) "${command[@]}" & ;;
        *) ssh "${hosts[$rank]}" "cd $(printf %q "$PWD") && $(printf '%q ' "${command[@]}")" & ;;
    esac
    pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' INT TERM  # Ctrl-C: every node checkpoints and stops
status=0
for pid in "${pids[@]}"; do
    code=0
    wait "$pid" || code=$?
    while kill -0 "$pid" 2>/dev/null; do  # the trap interrupted `wait`: wait for the node to finish saving
        code=0
        wait "$pid" || code=$?
    done
    [ "$code" = 0 ] || status=$code
done
exit "$status"
