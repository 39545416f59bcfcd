#!/usr/bin/env bash
# One node's part of a multi-node training job (workflow/rules/common.smk: launch_command). srun starts it once
# per node (--ntasks-per-node=1); it runs that node's launcher with the node's machine rank and the rendezvous on
# the job's first node:
#   node_launch.sh PORT LAUNCHER... -- PROGRAM...
# runs  LAUNCHER... --machine_rank $SLURM_NODEID --main_process_ip <first node> --main_process_port PORT PROGRAM...
# PORT was picked free on the node that runs the job script, the first node of the allocation.
set -euo pipefail

port=${1:?usage: node_launch.sh PORT LAUNCHER... -- PROGRAM...}
shift
launcher=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    launcher+=("$1")
    shift
done
if [ $# -eq 0 ]; then
    echo "node_launch.sh: no '--' between the launcher and the program" >&2
    exit 2
fi
shift

rank=${SLURM_NODEID:?node_launch.sh runs under srun, one task per node (SLURM_NODEID is not set)}
if [ "${SLURM_PROCID:-$rank}" != "$rank" ]; then
    echo "node_launch.sh: task $SLURM_PROCID runs on node $rank: the job needs one task per node" \
         "(srun --ntasks-per-node=1)" >&2
    exit 2
fi
nodes=${SLURM_STEP_NODELIST:-${SLURM_JOB_NODELIST:?neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST is set}}
hosts=$(scontrol show hostnames "$nodes")
first=${hosts%%$'\n'*}

exec "${launcher[@]}" --machine_rank "$rank" --main_process_ip "$first" --main_process_port "$port" "$@"
