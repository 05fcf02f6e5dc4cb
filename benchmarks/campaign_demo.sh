#!/usr/bin/env bash
# A campaign surviving a dead worker, on the real services: 3 LinUCB workers share a 24-trial
# study on PostgreSQL + the MLflow server; one is SIGKILLed mid-trial, one joins late. Prints
# the trial states, the runs and the registered model.
#   benchmarks/campaign_demo.sh /path/to/ml-100k
set -u
data=$(realpath "${1:?usage: benchmarks/campaign_demo.sh ML100K_DIR}")
cd "$(dirname "$0")/.."
eval "$(./stack.sh up)"
study=demo-$(date +%H%M%S)
common=(training=quick "data.dir=$data" "hydra.sweeper.study_name=$study"
        "tracking.experiment=$study" sweep.heartbeat_s=2 sweep.grace_s=10)
out=$(mktemp -d)
SECONDS=0
./multirun.sh linucb --workers 2 --trials 24 "${common[@]}" >"$out/first.txt" 2>&1 &
first=$!
until grep -q "worker 1: pid" "$out/first.txt" 2>/dev/null; do sleep 1; done
pid=$(sed -n 's/.*worker 1: pid \([0-9]*\),.*/\1/p' "$out/first.txt")
log=$(sed -n 's/.*worker 1: pid [0-9]*, log \(.*\)$/\1/p' "$out/first.txt")
until [ "$(grep -c 'Trial [0-9]*:' "$log" 2>/dev/null)" -ge 5 ] && tail -1 "$log" | grep -q "Training linucb\|training:"; do sleep 0.5; done
kill -9 "$pid"   # the worker's python: SIGKILL mid-trial
echo "killed worker 1 (pid $pid) at ${SECONDS}s"
./multirun.sh linucb --workers 1 --trials 24 "${common[@]}" >"$out/late.txt" 2>&1
echo "late joiner exited $?"
wait $first; echo "first invocation exited $? after ${SECONDS}s"
uv run python - "$study" <<'PY'
import collections, sys, mlflow, optuna, os
study_name = sys.argv[1]
study = optuna.load_study(study_name=study_name, storage=os.environ["OPTUNA_STORAGE"])
print("Optuna:", dict(collections.Counter(t.state.name for t in study.trials)))
client = mlflow.MlflowClient()
runs = client.search_runs([client.get_experiment_by_name(study_name).experiment_id])
parents = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
children = [r for r in runs if r.data.tags.get("sweep.role") != "parent"]
print("parents:", [r.info.status for r in parents])
print("children:", dict(collections.Counter(r.info.status for r in children)))
print("dead:", [r.data.tags.get("bandits.ended_by") for r in children if r.info.status == "FAILED"])
print("best:", parents[0].data.tags.get("best.trial"), parents[0].data.metrics.get("best/train/cumulative_regret"))
print("registered:", [(v.name, v.version) for v in client.search_model_versions(f"name = '{study_name}-best'")])
PY
