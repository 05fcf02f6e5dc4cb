#!/usr/bin/env bash
# A campaign on N worker processes sharing one Optuna study (src.sweep work).
#
#   ./multirun.sh SWEEP [--workers N] [--trials N] [--storage URL] [--ray ADDRESS] [Hydra overrides...]
#   ./multirun.sh all   [same options]          # every conf/hparams_search/*.yaml in turn
#
# SWEEP is a conf/hparams_search/*.yaml (an agent's search, or `grid` for agents x seeds).
# --trials is the study's number of COMPLETE trials: running the same sweep again, here or on
# another machine, joins it until that many are complete. --storage defaults to
# $OPTUNA_STORAGE (eval "$(./stack.sh up)"), else sqlite:///optuna.db in the project.
# Worker output goes to logs/sweeps/<study>/<time>-worker-<i>.log (under $SWEEP_LOG_DIR if
# set), and a line per trial as it starts and ends to the console; the script waits for its
# workers, reports the best trial, and exits 0 when the study holds its trials (saying which
# workers stopped early and why), 1 when it does not. With --ray ADDRESS the workers are tasks of
# the Ray cluster there (./ray_cluster.sh, docs/campaigns.md), one CPU each, placed by Ray: their
# lines come to this console, their logs stay in Ray's session logs on their nodes.
set -uo pipefail
cd "$(dirname "$0")"

usage() { sed -n '4,5p' "$0" | sed 's/^# *//' >&2; exit 2; }
print_help() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0; }
value_of() { [ $# -ge 2 ] && [[ $2 != --* ]] || { echo "error: $1 needs a value" >&2; exit 2; }; }
[ $# -ge 1 ] || usage
[[ $1 == -h || $1 == --help ]] && print_help
agent=$1; shift
workers=1; trials=""; storage=""; ray=""; overrides=()
while [ $# -gt 0 ]; do
  case $1 in
    --workers) value_of "$@"; workers=$2; shift 2 ;;
    --trials) value_of "$@"; trials=$2; shift 2 ;;
    --storage) value_of "$@"; storage=$2; shift 2 ;;
    --ray) value_of "$@"; ray=$2; shift 2 ;;
    -h|--help) print_help ;;
    *) overrides+=("$1"); shift ;;
  esac
done
[[ $workers =~ ^[1-9][0-9]*$ ]] || { echo "error: --workers must be a positive integer, got '$workers'" >&2; exit 2; }
[[ -z $trials || $trials =~ ^[1-9][0-9]*$ ]] || { echo "error: --trials must be a positive integer, got '$trials'" >&2; exit 2; }

if [ "$agent" = all ]; then
  failed=0
  for config in conf/hparams_search/*.yaml; do
    name=$(basename "$config" .yaml)
    # A sweep scored off-policy learns from a logged run, which only the user can name.
    if grep -q '^objective: ope/' "$config" && [[ " ${overrides[*]} " != *" offline.logs_run_id="* ]]; then
      echo "=== sweep $name skipped: it learns from logged interactions; pass offline.logs_run_id=<run id> ==="
      continue
    fi
    echo "=== sweep $name ==="
    args=(--workers "$workers")
    [ -n "$storage" ] && args+=(--storage "$storage")
    [ -n "$trials" ] && args+=(--trials "$trials")
    [ -n "$ray" ] && args+=(--ray "$ray")
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

sweep=("hparams_search=$agent" "${overrides[@]}")
[ -n "$storage" ] && sweep+=("hydra.sweeper.storage=$storage")
[ -n "$trials" ] && sweep+=("hydra.sweeper.n_trials=$trials")

if [ -n "$ray" ]; then uv run --no-sync python -m src.sweep check-ray "$ray" || exit 2; fi
# Creates or resumes the study and its MLflow parent run; checks storage and direction.
echo "Preparing the study (loading MLflow and Optuna)..."
state_file=$(mktemp)
trap 'rm -f "$state_file"' EXIT
SWEEP_STATE_FILE=$state_file uv run python -m src.sweep prepare "${sweep[@]}" >/dev/null || exit 2
IFS= read -r study <"$state_file"  # a name prepare has checked: letters, digits, '.', '_', '-'
stamp=$(date +%Y%m%d-%H%M%S)
logs="${SWEEP_LOG_DIR:-logs/sweeps}/$study"
mkdir -p "$logs"

if [ -n "$ray" ]; then
  echo "Study '$study' on $workers worker(s) as tasks of the Ray cluster at $ray"
  uv run --no-sync python -m src.sweep ray "$ray" "$workers" "${sweep[@]}"
  status=$?
  [ "$status" -eq 2 ] && exit 2  # the cluster cannot be reached: said in one line
  if uv run --no-sync python -m src.sweep summarise "${sweep[@]}"; then exit 0; fi
  exit 1
fi

pids=()
stop() {
  echo "Stopping the workers; their trials in progress end FAIL in Optuna and KILLED in MLflow." >&2
  kill -TERM "${pids[@]}" 2>/dev/null
}
trap stop INT TERM
echo "Study '$study' on $workers worker(s); logs in $logs/"
worker_logs=()
# The environment's own Python, not `uv run`: the pid printed and signalled is then the worker's
# (a SIGKILL to uv's left its worker training on).
python=$(uv run --no-sync python -c 'import sys; print(sys.executable)')
for ((i = 0; i < workers; i++)); do
  # Each worker samples with its own seed, or they would propose identical first trials.
  SWEEP_WORKER=$i SWEEP_WORKERS=$workers "$python" -m src.sweep work "${sweep[@]}" \
    >"$logs/$stamp-worker-$i.log" 2>&1 &
  pids+=($!)
  worker_logs+=("$logs/$stamp-worker-$i.log")
  echo "  worker $i: pid $!, log $logs/$stamp-worker-$i.log"
done
# A line per trial as it starts and ends, from the workers' logs (pids[] holds workers only).
tail -q -n +1 -F "${worker_logs[@]}" 2>/dev/null \
  > >(grep --line-buffered -oE 'Worker [0-9]+: loading.*|Trial [0-9]+ (started|finished|failed|pruned).*' \
      | grep --line-buffered -v 'failed with value None' | sed -u 's/^/  /') &  # Optuna's echo of a failure
follower=$!

stopped=()
for i in "${!pids[@]}"; do
  wait "${pids[$i]}"
  status=$?
  if [ "$status" -ne 0 ]; then
    reason=$(grep -h '\[ERROR\]' "$logs/$stamp-worker-$i.log" | tail -n 1 | sed 's/.*\] - //')
    # No error line: a signal stopped it (SIGKILL, out of memory); its trial runs again elsewhere.
    if [ -z "$reason" ] && [ "$status" -gt 128 ]; then
      reason="stopped by signal $((status - 128)); see $logs/$stamp-worker-$i.log"
    elif [ -z "$reason" ]; then
      reason="exit $status; see $logs/$stamp-worker-$i.log"
    fi
    stopped+=("worker $i stopped: $reason")
  fi
done
wait "${pids[@]}"  # a trapped signal ends the waits above early; the workers must be gone before the summary
sleep 1  # tail -F looks every second: the last trials' lines
kill "$follower" 2>/dev/null

# The last worker to finish has summarised the study; this reports its best trial, and exits 0
# only when the study holds its trials, whichever workers ran them.
if uv run --no-sync python -m src.sweep summarise "${sweep[@]}"; then
  for line in "${stopped[@]}"; do echo "note: $line; the other workers completed the study" >&2; done
  exit 0
fi
for line in "${stopped[@]}"; do echo "error: $line" >&2; done
exit 1
