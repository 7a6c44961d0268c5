#!/usr/bin/env bash
# Train on this machine: one process on all local devices, or N processes on
# localhost that meet through a loopback jax.distributed coordinator.
#
#   launch/local.sh CONFIG WORKDIR [cxr-train flags...]
#   launch/local.sh configs/quickstart.py /tmp/quickstart --config.batch_size=128
#   NUM_PROCESSES=2 launch/local.sh configs/quickstart.py /tmp/quickstart
#
# Environment:
#   NUM_PROCESSES         processes to start (default 1: one process, all devices).
#                         With N > 1 on a GPU machine process i sees GPU i only
#                         (CUDA_VISIBLE_DEVICES); on CPU each process gets
#                         CPU_DEVICES_PER_PROCESS simulated devices (default 1).
#   PORT                  coordinator port (default 12355).
#   CXR_TRAIN             the training command (default: cxr-train).
#   DRY_RUN=1             print the commands instead of running them.
# SIGTERM / Ctrl-C is passed on: every process checkpoints and exits; running
# the same command again resumes.
set -euo pipefail

if [[ $# -lt 2 ]]; then
  sed -n '2,19p' "$0" >&2
  exit 2
fi
config=$1
workdir=$2
shift 2
num_processes=${NUM_PROCESSES:-1}
port=${PORT:-12355}
read -r -a train <<< "${CXR_TRAIN:-cxr-train}"
base=("${train[@]}" "--config=${config}" "--workdir=${workdir}" "$@")

if [[ ${num_processes} -eq 1 ]]; then
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    echo "${base[*]}"
    exit 0
  fi
  exec "${base[@]}"
fi

gpus=0
if command -v nvidia-smi > /dev/null 2>&1; then
  gpus=$(nvidia-smi -L | wc -l)
fi
if [[ ${gpus} -gt 0 && ${num_processes} -gt ${gpus} ]]; then
  echo "NUM_PROCESSES=${num_processes} but this machine has ${gpus} GPUs" >&2
  exit 2
fi

pids=()
# shellcheck disable=SC2317  # invoked by the trap
stop() {
  for pid in "${pids[@]}"; do
    kill -TERM "${pid}" 2> /dev/null || true
  done
}
trap stop TERM INT

for ((i = 0; i < num_processes; i++)); do
  cmd=("${base[@]}" "--coordinator_address=127.0.0.1:${port}"
       "--num_processes=${num_processes}" "--process_id=${i}")
  if [[ ${gpus} -gt 0 ]]; then
    devices=(env "CUDA_VISIBLE_DEVICES=${i}")
  else
    devices=(env "XLA_FLAGS=--xla_force_host_platform_device_count=${CPU_DEVICES_PER_PROCESS:-1}"
             JAX_PLATFORMS=cpu)
  fi
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    echo "${devices[*]} ${cmd[*]}"
    continue
  fi
  "${devices[@]}" "${cmd[@]}" &
  pids+=($!)
done

status=0
for pid in "${pids[@]}"; do
  # wait returns early when a trapped signal arrives: wait again for the exit status.
  while true; do
    if wait "${pid}"; then
      code=0
    else
      code=$?
    fi
    if kill -0 "${pid}" 2> /dev/null; then
      continue
    fi
    break
  done
  if [[ ${code} -gt ${status} ]]; then
    status=${code}
  fi
done
exit "${status}"
