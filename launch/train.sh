#!/usr/bin/env bash
# Start a ufo training run on one node or many, with torchrun (rendezvous) or DeepSpeed's launcher.
# On several nodes, run the same command on every node; only --node-rank differs.
set -euo pipefail

usage() {
    cat <<'USAGE'
usage: launch/train.sh [options] CONFIG [ufo train arguments, e.g. --set train.steps=1000]

  --launcher torchrun|deepspeed  torchrun: c10d rendezvous at MASTER_ADDR:MASTER_PORT (default);
                                 deepspeed: DeepSpeed's launcher, one per node (--no_ssh), or with
                                 --ssh from node 0 alone over pdsh
  --nodes N                      nodes in the run (default 1; deepspeed: the hostfile's lines)
  --node-rank R                  this node's index, 0 on the node at --master-addr (default 0)
  --procs-per-node P             ranks per node (default: the GPUs nvidia-smi lists, else 1)
  --master-addr ADDR             node 0's address, reachable from every node (default 127.0.0.1)
  --master-port PORT             rendezvous port on node 0 (default 29500)
  --hostfile FILE                deepspeed: MPI-style hostfile (launch/hostfile.example)
  --iface IFACE                  network interface between nodes (NCCL/gloo socket interface)
  --local-addr ADDR              this node's address as the others reach it (default: IFACE's)
  --ssh                          deepspeed: start every node from this one over pdsh/ssh
  --rdzv-id ID                   torchrun: rendezvous id shared by the nodes (default ufo)

Environment: launch/env.sh (MASTER_ADDR, MASTER_PORT, UFO_IFACE, UFO_PYTHON, OMP_NUM_THREADS).
USAGE
}

die() { echo "launch/train.sh: $*" >&2; exit 2; }
need() { [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value (see --help)"; }

LAUNCHER=torchrun NODES="" NODE_RANK=0 PROCS="" HOSTFILE="" LOCAL_ADDR="" SSH=0 RDZV_ID="${RDZV_ID:-ufo}"
while [ $# -gt 0 ]; do
    case "$1" in
        --launcher) need "$@"; LAUNCHER=$2; shift 2 ;;
        --nodes) need "$@"; NODES=$2; shift 2 ;;
        --node-rank) need "$@"; NODE_RANK=$2; shift 2 ;;
        --procs-per-node) need "$@"; PROCS=$2; shift 2 ;;
        --master-addr) need "$@"; export MASTER_ADDR=$2; shift 2 ;;
        --master-port) need "$@"; export MASTER_PORT=$2; shift 2 ;;
        --hostfile) need "$@"; HOSTFILE=$2; shift 2 ;;
        --iface) need "$@"; export UFO_IFACE=$2; shift 2 ;;
        --local-addr) need "$@"; LOCAL_ADDR=$2; shift 2 ;;
        --ssh) SSH=1; shift ;;
        --rdzv-id) need "$@"; RDZV_ID=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) break ;;
    esac
done
[ $# -ge 1 ] || die "give a config file (see --help)"
CONFIG=$1; shift
[ -f "$CONFIG" ] || die "$CONFIG: no such config file"

# shellcheck source=launch/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

if [ -z "$PROCS" ]; then
    PROCS=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
    [ "$PROCS" -gt 0 ] || PROCS=1
fi
if [ -z "$LOCAL_ADDR" ] && [ -n "${UFO_IFACE:-}" ]; then
    LOCAL_ADDR=$(ip -4 -o addr show dev "$UFO_IFACE" 2>/dev/null | awk '{print $4}' | cut -d/ -f1 | head -n1)
    [ -n "$LOCAL_ADDR" ] || die "--iface $UFO_IFACE: no IPv4 address on this interface"
fi

case "$LAUNCHER" in
    torchrun)
        NODES=${NODES:-1}
        args=(--nnodes "$NODES" --nproc_per_node "$PROCS")
        if [ "$NODES" -gt 1 ]; then
            # node 0 hosts the rendezvous store; the others find it at MASTER_ADDR:MASTER_PORT
            is_host=$([ "$NODE_RANK" -eq 0 ] && echo 1 || echo 0)
            args+=(--rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$RDZV_ID"
                   --rdzv_conf "is_host=$is_host")
            [ -z "$LOCAL_ADDR" ] || args+=(--local_addr "$LOCAL_ADDR")
        else
            args+=(--master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
        fi
        echo "launch/train.sh: torchrun, node $NODE_RANK of $NODES, $PROCS rank(s) here, rendezvous $MASTER_ADDR:$MASTER_PORT"
        cmd=("$UFO_PYTHON" -m torch.distributed.run "${args[@]}" -m ufo.cli train "$CONFIG" "$@")
        ;;
    deepspeed)
        args=(--master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
        if [ -n "$HOSTFILE" ]; then
            [ -f "$HOSTFILE" ] || die "$HOSTFILE: no such hostfile"
            hosts=$(grep -cvE '^[[:space:]]*(#|$)' "$HOSTFILE" || true)
            [ -z "$NODES" ] || [ "$NODES" -eq "$hosts" ] || die "--nodes $NODES but $HOSTFILE lists $hosts hosts"
            NODES=$hosts
            args+=(--hostfile "$HOSTFILE")
            if [ "$SSH" -eq 0 ]; then
                args+=(--no_ssh --node_rank "$NODE_RANK")
            fi
        else
            [ "${NODES:-1}" -eq 1 ] || die "--launcher deepspeed on $NODES nodes needs --hostfile"
            NODES=1
            args+=(--num_gpus "$PROCS")
        fi
        echo "launch/train.sh: deepspeed, node $NODE_RANK of $NODES, master $MASTER_ADDR:$MASTER_PORT"
        cmd=("$UFO_BIN/deepspeed" "${args[@]}" --module ufo.cli train "$CONFIG" "$@")
        ;;
    *) die "--launcher $LAUNCHER: use torchrun or deepspeed" ;;
esac

# A signal to this script (a supervisor's SIGTERM, Slurm's SIGUSR1, this script as a container's
# PID 1) is not passed to the launcher, which would kill the ranks 30 s later, mid-checkpoint:
# the script writes UFO_STOP_FILE, which every rank here watches; they checkpoint and stop in
# their own time, write "3" to UFO_EXIT_FILE, and the script exits 3 (checkpoint written, rerun
# to resume) whatever the launcher says. The ranks also stop if this script dies.
state=$(mktemp -d "${TMPDIR:-/tmp}/ufo-launch.XXXXXX")
export UFO_STOP_FILE="$state/stop" UFO_EXIT_FILE="$state/exit"
stop() {
    echo "launch/train.sh: $1: every rank checkpoints and stops" >&2
    echo "$1" > "$UFO_STOP_FILE"
}
for sig in TERM INT USR1 HUP; do
    # shellcheck disable=SC2064
    trap "stop SIG$sig" "$sig"
done
"${cmd[@]}" &
launcher=$!
rc=0
while :; do
    wait "$launcher" && rc=0 || rc=$?
    kill -0 "$launcher" 2>/dev/null || break  # a trapped signal ends `wait` early: wait again
done
if [ "$rc" -ne 0 ] && [ "$(cat "$UFO_EXIT_FILE" 2>/dev/null)" = 3 ]; then
    rc=3
fi
rm -rf "$state"
exit "$rc"
