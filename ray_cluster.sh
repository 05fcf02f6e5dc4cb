#!/usr/bin/env bash
# A Ray cluster for campaigns (multirun.sh --ray, benchmarks.leaderboard --ray; docs/campaigns.md).
#
#   ./ray_cluster.sh up [--port P] [--cpus N]            # a head node on this machine; prints its address
#   ./ray_cluster.sh join ADDRESS [--cpus N] [--block]   # this machine joins as a worker node
#   ./ray_cluster.sh status ADDRESS                      # nodes, CPUs, what runs
#   ./ray_cluster.sh down                                # stops every Ray process of this machine
#
# Each node runs the project from its own checkout at the same path, synced with
# `uv sync --extra ray`. RAY_NODE_IP (default 127.0.0.1) is the address a node gives the others:
# set it to the machine's own address for a cluster of several machines. Ray's services listen
# on every interface of a node whatever that address: run it on a network you trust.
set -euo pipefail
cd "$(dirname "$0")"

die() { echo "error: $*" >&2; exit 2; }
node_ip=${RAY_NODE_IP:-127.0.0.1}
ray_cmd() { RAY_USAGE_STATS_ENABLED=0 uv run --no-sync ray "$@"; }
[ $# -ge 1 ] || die "usage: ./ray_cluster.sh {up|join ADDRESS|status ADDRESS|down} [--port P] [--cpus N] [--block]"
command=$1; shift
address=""
if [ "$command" = join ] || [ "$command" = status ]; then
  [ $# -ge 1 ] || die "$command needs the cluster's ADDRESS (host:port, as \`up\` prints it)"
  address=$1; shift
fi
port=6379; cpus=""; block=()
while [ $# -gt 0 ]; do
  case $1 in
    --port) [ $# -ge 2 ] || die "--port needs a value"; port=$2; shift 2 ;;
    --cpus) [ $# -ge 2 ] || die "--cpus needs a value"; cpus=$2; shift 2 ;;
    --block) block=(--block); shift ;;
    *) die "unknown option '$1'" ;;
  esac
done
[[ $port =~ ^[1-9][0-9]*$ ]] || die "--port must be a port number, got '$port'"
[[ -z $cpus || $cpus =~ ^[1-9][0-9]*$ ]] || die "--cpus must be a positive integer, got '$cpus'"
cpu_args=(); [ -n "$cpus" ] && cpu_args=(--num-cpus "$cpus")
uv run --no-sync python -c 'import ray' 2>/dev/null || die "Ray is not installed: uv sync --extra ray"

case $command in
  up)
    ray_cmd start --head --node-ip-address "$node_ip" --port "$port" --include-dashboard=false \
      --disable-usage-stats "${cpu_args[@]}" "${block[@]}" >&2
    echo "Ray head at $node_ip:$port; campaigns: ./multirun.sh linucb --workers 4 --ray $node_ip:$port" >&2
    echo "$node_ip:$port" ;;
  join)
    ray_cmd start --address "$address" --node-ip-address "$node_ip" --disable-usage-stats \
      "${cpu_args[@]}" "${block[@]}" >&2 ;;
  status) ray_cmd status --address "$address" ;;
  down) ray_cmd stop --force >&2 ;;
  *) die "unknown command '$command': up, join, status or down" ;;
esac
