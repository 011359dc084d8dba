# Environment for a ufo training launch, in one place; sourced by launch/train.sh and slurm/train.sbatch.
#
#   MASTER_ADDR    address of node 0 (default: 127.0.0.1 on one node)
#   MASTER_PORT    its rendezvous port (default: 29500)
#   UFO_IFACE      network interface the ranks talk over (sets NCCL_SOCKET_IFNAME and
#                  GLOO_SOCKET_IFNAME unless they are set); default: let NCCL/gloo choose
#   UFO_PYTHON     the Python that has ufo installed (default: the one on PATH)
#   OMP_NUM_THREADS  CPU threads per rank (default: ufo splits the host's cores between its ranks)

export MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
export MASTER_PORT="${MASTER_PORT:-29500}"
if [ -n "${UFO_IFACE:-}" ]; then
    export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-$UFO_IFACE}"
    export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-$UFO_IFACE}"
fi
export PYTHONUNBUFFERED=1              # progress lines reach the log as they happen
export NCCL_ASYNC_ERROR_HANDLING="${NCCL_ASYNC_ERROR_HANDLING:-1}"  # a dead peer fails the job, not hangs it
UFO_PYTHON="${UFO_PYTHON:-python}"
UFO_BIN="$(dirname "$(command -v "$UFO_PYTHON")")"   # deepspeed and torchrun of that same environment
