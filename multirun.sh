#!/usr/bin/env bash
# Parallel Optuna sweep: N worker processes share one study (Optuna's distributed mode).
#
#   ./multirun.sh AGENT [--workers N] [--trials N] [--storage URL] [Hydra overrides...]
#   ./multirun.sh all   [same options]          # every conf/hparams_search/*.yaml in turn
#
# --trials is the study's total: running the same sweep again resumes it until that many
# trials have finished. --storage defaults to sqlite:///optuna.db in the project; give an
# RDB URL (e.g. postgresql://user:pass@host/db) to spread workers over several machines.
# Worker output goes to logs/sweeps/<study>/<time>-worker-<i>.log; the script waits for all
# workers, reports the best trial, and exits non-zero if any worker failed.
set -uo pipefail
cd "$(dirname "$0")"

usage() { sed -n '4,5p' "$0" | sed 's/^# *//' >&2; exit 2; }
[ $# -ge 1 ] || usage
agent=$1; shift
workers=1; trials=""; storage="sqlite:///$PWD/optuna.db"; overrides=()
while [ $# -gt 0 ]; do
  case $1 in
    --workers) workers=${2:?--workers needs a number}; shift 2 ;;
    --trials) trials=${2:?--trials needs a number}; shift 2 ;;
    --storage) storage=${2:?--storage needs a URL}; shift 2 ;;
    -h|--help) usage ;;
    *) overrides+=("$1"); shift ;;
  esac
done
[[ $workers =~ ^[1-9][0-9]*$ ]] || { echo "error: --workers must be a positive integer, got '$workers'" >&2; exit 2; }
[[ -z $trials || $trials =~ ^[1-9][0-9]*$ ]] || { echo "error: --trials must be a positive integer, got '$trials'" >&2; exit 2; }

if [ "$agent" = all ]; then
  failed=0
  for config in conf/hparams_search/*.yaml; do
    name=$(basename "$config" .yaml)
    echo "=== sweep $name ==="
    args=(--workers "$workers" --storage "$storage")
    [ -n "$trials" ] && args+=(--trials "$trials")
    "$0" "$name" "${args[@]}" "${overrides[@]}" || failed=$((failed + 1))
  done
  [ "$failed" -eq 0 ] || { echo "error: $failed sweep(s) failed" >&2; exit 1; }
  exit 0
fi

if [ ! -f "conf/hparams_search/$agent.yaml" ]; then
  choices=$(ls conf/hparams_search | sed 's/\.yaml$//' | paste -sd, | sed 's/,/, /g')
  echo "error: no sweep for '$agent'; choose one of: $choices, all" >&2
  exit 2
fi

sweep=("hparams_search=$agent" "hydra.sweeper.storage=$storage" "${overrides[@]}")
[ -n "$trials" ] && sweep+=("hydra.sweeper.n_trials=$trials")

# Creates or resumes the study and its MLflow parent run; checks storage and direction.
state=$(uv run python -m src.sweep prepare "${sweep[@]}") || exit 2
eval "$state"  # study=... finished=... n_trials=... seed=...
remaining=$((n_trials - finished))
stamp=$(date +%Y%m%d-%H%M%S)
logs="logs/sweeps/$study"
mkdir -p "$logs"

pids=()
stop() {
  echo "Stopping the workers; their runs in progress are marked KILLED." >&2
  kill -TERM "${pids[@]}" 2>/dev/null
}
trap stop INT TERM
if [ "$remaining" -le 0 ]; then
  echo "Study '$study' already has $finished finished trials (target $n_trials); raise --trials to run more."
else
  echo "Study '$study': $finished trials finished, running $remaining more on $workers worker(s); logs in $logs/"
  for ((i = 0; i < workers; i++)); do
    share=$((remaining / workers + (i < remaining % workers ? 1 : 0)))
    [ "$share" -gt 0 ] || continue
    # Each worker samples with its own seed, or they would propose identical first trials.
    BANDIT_SWEEP_MANAGED=1 uv run --no-sync python -m src.train -m "${sweep[@]}" \
      "hydra.sweeper.n_trials=$share" "hydra.sweeper.sampler.seed=$((seed + finished + i))" \
      "hydra.sweep.dir=multirun/$study/$stamp-worker-$i" \
      >"$logs/$stamp-worker-$i.log" 2>&1 &
    pids+=($!)
    echo "  worker $i: $share trial(s), pid $!, log $logs/$stamp-worker-$i.log"
  done
fi

failed=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    failed=$((failed + 1))
    echo "error: worker $i failed; see the end of its log:" >&2
    tail -n 5 "$logs/$stamp-worker-$i.log" >&2
  fi
done
wait  # a trapped signal ends the waits above early; the workers must be gone before the summary

FAILED_WORKERS=$failed uv run --no-sync python -m src.sweep summarise "${sweep[@]}" || failed=$((failed + 1))
[ "$failed" -eq 0 ] || exit 1
