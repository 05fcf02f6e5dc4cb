#!/usr/bin/env bash
# The services a campaign shares: PostgreSQL (one database for the Optuna study, one for
# MLflow) and an MLflow tracking server on it, with a proxied artifact store.
#
#   eval "$(./stack.sh up)"   # start them (or find them running); point this shell at them
#   ./stack.sh env            # the export lines again, for another shell
#   ./stack.sh status         # what runs where; exit 0 when both are up, 3 otherwise
#   ./stack.sh down           # stop both; the data stays in .stack/ for the next `up`
#   ./stack.sh install        # install Debian's postgresql package (as root)
#
# State lives in $STACK_DIR (default .stack/ in the project, gitignored). Both services
# listen on $STACK_HOST (default 127.0.0.1); set STACK_HOST=0.0.0.0 and give the workers on
# other machines this machine's name in the exported URLs. Off loopback (or with
# STACK_AUTH=1) the MLflow server asks for a user and password (MLflow's basic-auth app):
# `up` and `env` export them as MLFLOW_TRACKING_USERNAME/PASSWORD; $STACK_DIR/mlflow-admin
# keeps them, readable by its owner only. The artifact store is
# $STACK_DIR/artifacts unless MLFLOW_ARTIFACTS_DESTINATION names another (s3://bucket/path,
# with the usual AWS_* / MLFLOW_S3_ENDPOINT_URL variables for MinIO).
set -euo pipefail
cd "$(dirname "$0")"

STACK_DIR=${STACK_DIR:-$PWD/.stack}
STACK_HOST=${STACK_HOST:-127.0.0.1}
PG_USER=bandits
# The cluster: in the stack's folder, or where .stack/pg links to (see init_postgres).
if [ -L "$STACK_DIR/pg" ]; then PG_DIR=$(readlink -f "$STACK_DIR/pg"); else PG_DIR=$STACK_DIR/pg; fi
say() { echo "stack: $*" >&2; }
die() { echo "error: $*" >&2; exit 2; }

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port_of() {  # a service's port, chosen once and kept, so the URLs stay valid across restarts
  local file="$STACK_DIR/$1.port"
  [ -s "$file" ] || free_port >"$file"
  cat "$file"
}
pg_bin() {
  local bin
  bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  [ -n "$bin" ] || die "PostgreSQL is not installed; run: ./stack.sh install (Debian's postgresql package, as root)"
  echo "$bin"
}
# PostgreSQL refuses to run as root; Debian's package brings the `postgres` user for that.
as_db_owner() { if [ "$(id -u)" = 0 ]; then (cd / && runuser -u postgres -- "$@"); else "$@"; fi; }
password() { cat "$PG_DIR/password"; }
database_url() { echo "postgresql+psycopg://$PG_USER:$(password)@$STACK_HOST:$(port_of postgres)/$1"; }
# The MLflow server's URL names no password: `ps` shows every user a command line (and
# /proc/<pid>/environ only to the owner); libpq reads the password from this owner-only file.
passfile() {
  local file="$STACK_DIR/pgpass"
  (umask 077 && echo "$STACK_HOST:$(port_of postgres):*:$PG_USER:$(password)" >"$file")
  echo "$file"
}
# Anyone who can reach a server on the network could read and write every run without it.
auth_on() { [ "${STACK_AUTH:-}" = 1 ] || { [ "$STACK_HOST" != 127.0.0.1 ] && [ "$STACK_HOST" != localhost ]; }; }
secret() {  # $STACK_DIR/$1, a random token made once, readable by its owner only
  local file="$STACK_DIR/$1"
  [ -s "$file" ] || (umask 077 && python3 -c 'import secrets; print(secrets.token_urlsafe(18))' >"$file")
  cat "$file"
}
admin_password() { secret mlflow-admin; }
auth_config() {  # MLflow's basic-auth settings: users in a SQLite file beside the stack's state
  local file="$STACK_DIR/basic_auth.ini"
  (umask 077 && printf '[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///%s\nadmin_username = admin\nauthorization_function = mlflow.server.auth:authenticate_request_basic_auth\n' \
    "$STACK_DIR/basic_auth.db" >"$file")
  echo "$file"
}
mlflow_bin() { uv run --no-sync python -c 'import shutil; print(shutil.which("mlflow"))'; }
tracking_uri() { echo "http://$STACK_HOST:$(port_of mlflow)"; }
pg_running() { as_db_owner "$(pg_bin)/pg_ctl" -D "$PG_DIR/data" status >/dev/null 2>&1; }
mlflow_running() { curl -fsS "$(tracking_uri)/health" >/dev/null 2>&1; }

init_postgres() {
  local bin=$1
  if [ "$(id -u)" = 0 ] && ! runuser -u postgres -- test -x "$STACK_DIR"; then
    # PostgreSQL runs as `postgres`, which cannot enter this folder (a private temp dir, say).
    PG_DIR=$(mktemp -d /var/tmp/bandits-pg.XXXXXX)
    ln -s "$PG_DIR" "$STACK_DIR/pg"
  fi
  say "creating a PostgreSQL cluster in $PG_DIR"
  mkdir -p "$PG_DIR"
  python3 -c 'import secrets; print(secrets.token_urlsafe(18))' >"$PG_DIR/password"
  chmod 600 "$PG_DIR/password"
  if [ "$(id -u)" = 0 ]; then chown -R postgres "$PG_DIR"; fi
  as_db_owner "$bin/initdb" -D "$PG_DIR/data" -U "$PG_USER" --pwfile="$PG_DIR/password" \
    --auth=scram-sha-256 --encoding=UTF8 >"$PG_DIR/initdb.log"
  # Workers on the machine's own networks may connect, with the password, when STACK_HOST allows.
  echo "host all all samenet scram-sha-256" | as_db_owner tee -a "$PG_DIR/data/pg_hba.conf" >/dev/null
}

start_postgres() {
  local bin port
  bin=$(pg_bin)
  [ -f "$PG_DIR/data/PG_VERSION" ] || init_postgres "$bin"
  port=$(port_of postgres)
  if pg_running; then
    say "PostgreSQL already running on $STACK_HOST:$port"
  else
    say "starting PostgreSQL on $STACK_HOST:$port"
    as_db_owner "$bin/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w -t 60 \
      -o "-p $port -c listen_addresses=$STACK_HOST -k $PG_DIR" start >/dev/null \
      || die "PostgreSQL did not start; see $STACK_DIR/pg/server.log"
  fi
  for database in optuna mlflow; do
    if ! PGPASSWORD=$(password) "$bin/psql" -h "$STACK_HOST" -p "$port" -U "$PG_USER" -d postgres -tAc \
        "SELECT 1 FROM pg_database WHERE datname = '$database'" | grep -q 1; then
      PGPASSWORD=$(password) "$bin/createdb" -h "$STACK_HOST" -p "$port" -U "$PG_USER" "$database"
      say "created database $database"
    fi
  done
}

start_mlflow() {
  local port artifacts
  port=$(port_of mlflow)
  if mlflow_running; then
    say "MLflow server already running at $(tracking_uri)"
    return
  fi
  artifacts=${MLFLOW_ARTIFACTS_DESTINATION:-$STACK_DIR/artifacts}
  mkdir -p "$STACK_DIR/artifacts"
  say "starting the MLflow server at $(tracking_uri) (artifacts: $artifacts)"
  # Its own session, so `down` stops the server and its workers together; started as the
  # server itself (not through `uv run`), so the pid file names the server. No GenAI job
  # runner: eight more processes (about 2 GB) for features bandit runs never use.
  local auth=()
  if auth_on; then
    auth=(--app-name basic-auth)
    export MLFLOW_AUTH_CONFIG_PATH MLFLOW_AUTH_ADMIN_PASSWORD MLFLOW_FLASK_SERVER_SECRET_KEY
    MLFLOW_AUTH_CONFIG_PATH=$(auth_config) MLFLOW_AUTH_ADMIN_PASSWORD=$(admin_password)
    MLFLOW_FLASK_SERVER_SECRET_KEY=$(secret "mlflow-csrf-key")  # the same across restarts: forms stay valid
    say "the MLflow server asks for user admin and the password in $STACK_DIR/mlflow-admin"
  fi
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false} PGPASSFILE=$(passfile) \
    MLFLOW_BACKEND_STORE_URI="postgresql+psycopg://$PG_USER@$STACK_HOST:$(port_of postgres)/mlflow" \
    setsid nohup "$(mlflow_bin)" server "${auth[@]}" \
    --artifacts-destination "$artifacts" --host "$STACK_HOST" --port "$port" --workers 2 \
    ${MLFLOW_ALLOWED_HOSTS:+--allowed-hosts "$MLFLOW_ALLOWED_HOSTS"} \
    >"$STACK_DIR/mlflow.log" 2>&1 &
  echo $! >"$STACK_DIR/mlflow.pid"
  for _ in $(seq 180); do
    mlflow_running && return
    kill -0 "$(cat "$STACK_DIR/mlflow.pid")" 2>/dev/null || break
    sleep 1
  done
  die "the MLflow server did not come up; see $STACK_DIR/mlflow.log"
}

exports() {
  echo "export MLFLOW_TRACKING_URI=$(tracking_uri)"
  echo "export OPTUNA_STORAGE=$(database_url optuna)"
  if [ -s "$STACK_DIR/mlflow-admin" ]; then
    echo "export MLFLOW_TRACKING_USERNAME=admin"
    echo "export MLFLOW_TRACKING_PASSWORD=$(cat "$STACK_DIR/mlflow-admin")"
  fi
}

case ${1:-} in
  up)
    mkdir -p "$STACK_DIR"
    start_postgres
    start_mlflow
    exports
    ;;
  env)
    [ -s "$PG_DIR/password" ] || die "no stack in $STACK_DIR; run: eval \"\$(./stack.sh up)\""
    exports
    ;;
  status)
    up=0
    if [ -f "$PG_DIR/data/PG_VERSION" ] && pg_running; then
      echo "PostgreSQL: running on $STACK_HOST:$(port_of postgres) (databases optuna, mlflow)"
    else echo "PostgreSQL: stopped"; up=3; fi
    if [ -s "$STACK_DIR/mlflow.port" ] && mlflow_running; then
      if [ "$up" = 0 ]; then echo "MLflow server: running at $(tracking_uri)"
      # /health answers without asking the database; every request that reads runs would fail.
      else echo "MLflow server: up at $(tracking_uri) but unusable: its PostgreSQL database is stopped"; fi
    else echo "MLflow server: stopped"; up=3; fi
    exit $up
    ;;
  down)
    if [ -s "$STACK_DIR/mlflow.pid" ] && kill -0 "$(cat "$STACK_DIR/mlflow.pid")" 2>/dev/null; then
      kill -TERM -- "-$(cat "$STACK_DIR/mlflow.pid")" 2>/dev/null || true
      say "stopped the MLflow server"
    fi
    rm -f "$STACK_DIR/mlflow.pid"
    if [ -f "$PG_DIR/data/PG_VERSION" ] && pg_running; then
      as_db_owner "$(pg_bin)/pg_ctl" -D "$PG_DIR/data" -m fast -w stop >/dev/null
      say "stopped PostgreSQL"
    fi
    ;;
  install)
    if ls -d /usr/lib/postgresql/*/bin >/dev/null 2>&1; then say "PostgreSQL is installed"; exit 0; fi
    [ "$(id -u)" = 0 ] || die "installing PostgreSQL needs root: sudo ./stack.sh install"
    say "installing Debian's postgresql package"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    ;;
  *)
    sed -n '2,9p' "$0" | sed 's/^# *//' >&2
    exit 2
    ;;
esac
