#!/usr/bin/env bash
# Start SAE Studio: a private, password-protected Redis (unless REDIS_URL names a shared one), one
# RQ worker per GPU (one on a CPU-only box) and the web server, kept up by scripts/supervise.py (a
# program that dies is started again, with a back-off). Ctrl-C stops them all.
set -euo pipefail
: "${DATA_DIR:?}" "${PORT:?}" "${REDIS_PORT:?}" "${PY:?}"
HOST="${HOST:-127.0.0.1}"
WEB_WORKERS="${WEB_WORKERS:-2}"
export DATA_DIR HOST PORT REDIS_PORT PY WEB_WORKERS

# Everything under DATA_DIR is this account's alone: the database (password hashes), uploads,
# logs, the secret key and the Redis password. New files 0600 and folders 0700 (umask, inherited
# by every program started from here); existing ones are brought to that too.
umask 077
mkdir -p "$DATA_DIR/redis" "$DATA_DIR/logs"
chmod 700 "$DATA_DIR" && chmod -R go-rwx "$DATA_DIR" \
  || echo "Warning: could not make $DATA_DIR private (chmod -R go-rwx); other accounts may read it." >&2

# The queue's password: generated once, kept in DATA_DIR (mode 0600).
pwfile="$DATA_DIR/redis-password"
if [[ ! -s "$pwfile" ]]; then
  "$PY" -c "import secrets; print(secrets.token_hex(24))" >"$pwfile"
fi
chmod 600 "$pwfile"
REDIS_PASSWORD="$(cat "$pwfile")"
export REDIS_PASSWORD
# A REDIS_URL given here is a queue of your own (several boxes share one): no Redis is started then.
external_redis=0
[[ -n "${REDIS_URL:-}" ]] && external_redis=1
export REDIS_URL="${REDIS_URL:-redis://:${REDIS_PASSWORD}@127.0.0.1:${REDIS_PORT}/0}"

case "$HOST" in
  127.*|localhost|::1) loopback=1 ;;
  *) loopback=0 ;;
esac

SUPERVISE_REDIS=1
if [[ $external_redis == 1 ]]; then
  echo "Using the queue at REDIS_URL (set outside): no Redis is started here"
  SUPERVISE_REDIS=0
elif redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 || redis-cli -p "$REDIS_PORT" ping 2>&1 | grep -q NOAUTH; then
  # Something answers on the port: use it only if it is ours (it knows our password).
  if REDISCLI_AUTH="$REDIS_PASSWORD" redis-cli -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG \
      && ! redis-cli -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; then
    echo "Redis on port $REDIS_PORT is this app's (it knows the password in $pwfile): using it (not supervised)"
    SUPERVISE_REDIS=0
  else
    echo "Port $REDIS_PORT is taken by a Redis this app did not start (or one without a password)." >&2
    echo "Stop it, or run with REDIS_PORT=<a free port>." >&2
    exit 1
  fi
fi
export SUPERVISE_REDIS

"$PY" -m flask --app app init-db
if [[ $loopback == 1 ]]; then
  "$PY" -m flask --app app users ensure-admin
elif [[ "$("$PY" -m flask --app app users count)" == "0" ]]; then
  echo "Refusing to serve on $HOST (beyond this machine) with no accounts: create one first with" >&2
  echo "  $PY -m flask --app app users create NAME --admin" >&2
  exit 1
elif [[ -z "${TRUSTED_HOSTS:-}" && -z "${EXTERNAL_URL:-}" ]]; then
  echo "Serving on $HOST: set EXTERNAL_URL (e.g. https://sae.example.org) or TRUSTED_HOSTS to the names the" >&2
  echo "team uses to reach it; requests naming any other host are refused." >&2
  exit 1
fi
# The supervisor starts Redis (unless ours was already up), the worker and the web server, restarts
# any that dies, and stops them all on Ctrl-C (SIGINT) or SIGTERM.
exec "$PY" "$(dirname "$0")/supervise.py"
