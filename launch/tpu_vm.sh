#!/usr/bin/env bash
# Cloud TPU VM (single host or pod slice): install cxr_jax on every worker,
# then start cxr-train on all workers at once (one process per host; JAX
# initialises the pod from the TPU metadata, CXR_DISTRIBUTED_AUTO=1).
#
#   launch/tpu_vm.sh install TPU_NAME ZONE
#   launch/tpu_vm.sh run TPU_NAME ZONE CONFIG WORKDIR [cxr-train flags...]
#   launch/tpu_vm.sh run my-v4-32 us-central2-b configs/baseline.py:dataset=nih gs://bucket/runs/nih
#
# Environment:
#   REPO_URL    git URL of cxr_jax to clone on the workers (default: this checkout's origin).
#   REPO_DIR    where it lives on the workers (default: ~/cxr_jax).
#   DRY_RUN=1   print the gcloud commands instead of running them.
# WORKDIR must be shared by the workers (a gs:// bucket or a mounted file
# system). A preempted or stopped run resumes when the same command is run again.
set -euo pipefail

if [[ $# -lt 3 ]]; then
  sed -n '2,15p' "$0" >&2
  exit 2
fi
action=$1
tpu=$2
zone=$3
shift 3
repo_dir=${REPO_DIR:-'~/cxr_jax'}
repo_url=${REPO_URL:-$(git -C "$(dirname "$0")" remote get-url origin 2> /dev/null || echo "")}

on_all_workers() {
  local cmd=(gcloud compute tpus tpu-vm ssh "${tpu}" "--zone=${zone}" --worker=all "--command=$1")
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    printf '%q ' "${cmd[@]}"
    echo
  else
    "${cmd[@]}"
  fi
}

case ${action} in
  install)
    if [[ -z ${repo_url} ]]; then
      echo "set REPO_URL to a git URL the workers can clone" >&2
      exit 2
    fi
    on_all_workers "set -e; [ -d ${repo_dir} ] || git clone ${repo_url} ${repo_dir}; \
cd ${repo_dir} && git pull --ff-only && python3 -m venv .venv && . .venv/bin/activate && \
pip install -U pip && pip install -e . 'jax[tpu]'"
    ;;
  run)
    if [[ $# -lt 2 ]]; then
      echo "usage: $0 run TPU_NAME ZONE CONFIG WORKDIR [cxr-train flags...]" >&2
      exit 2
    fi
    args=$(printf '%q ' "--config=$1" "--workdir=$2" "${@:3}")
    on_all_workers "cd ${repo_dir} && . .venv/bin/activate && CXR_DISTRIBUTED_AUTO=1 cxr-train ${args}"
    ;;
  *)
    echo "unknown action ${action}: install or run" >&2
    exit 2
    ;;
esac
