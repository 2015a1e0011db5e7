#!/usr/bin/env bash
# Start SAE Studio: a private, password-protected Redis, one RQ worker and the web server.
# Ctrl-C stops all three.
set -euo pipefail
: "${DATA_DIR:?}" "${PORT:?}" "${REDIS_PORT:?}" "${PY:?}"
HOST="${HOST:-127.0.0.1}"
WEB_WORKERS="${WEB_WORKERS:-2}"
export DATA_DIR
mkdir -p "$DATA_DIR/redis" "$DATA_DIR/logs"

# The queue's password: generated once, kept in DATA_DIR (mode 0600).
pwfile="$DATA_DIR/redis-password"
if [[ ! -s "$pwfile" ]]; then
  (umask 077; "$PY" -c "import secrets; print(secrets.token_hex(24))" >"$pwfile")
fi
chmod 600 "$pwfile"
REDIS_PASSWORD="$(cat "$pwfile")"
export REDIS_URL="${REDIS_URL:-redis://:${REDIS_PASSWORD}@127.0.0.1:${REDIS_PORT}/0}"

case "$HOST" in
  127.*|localhost|::1) loopback=1 ;;
  *) loopback=0 ;;
esac

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

if redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 || redis-cli -p "$REDIS_PORT" ping 2>&1 | grep -q NOAUTH; then
  # Something answers on the port: use it only if it is ours (it knows our password).
  if REDISCLI_AUTH="$REDIS_PASSWORD" redis-cli -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG \
      && ! redis-cli -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; then
    echo "Redis on port $REDIS_PORT is this app's (it knows the password in $pwfile): using it"
  else
    echo "Port $REDIS_PORT is taken by a Redis this app did not start (or one without a password)." >&2
    echo "Stop it, or run with REDIS_PORT=<a free port>." >&2
    exit 1
  fi
else
  # The password goes in through a config on stdin, never on the command line.
  printf 'requirepass %s\n' "$REDIS_PASSWORD" | redis-server - --port "$REDIS_PORT" --bind 127.0.0.1 \
    --dir "$DATA_DIR/redis" --save 60 1 --daemonize no --logfile "$DATA_DIR/logs/redis.log" &
  pids+=($!)
  for _ in $(seq 50); do REDISCLI_AUTH="$REDIS_PASSWORD" redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
  REDISCLI_AUTH="$REDIS_PASSWORD" redis-cli -p "$REDIS_PORT" ping >/dev/null \
    || { echo "Redis did not start; see $DATA_DIR/logs/redis.log"; exit 1; }
fi

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
"$PY" worker.py >>"$DATA_DIR/logs/worker.log" 2>&1 &
pids+=($!)
"$PY" -m gunicorn --bind "$HOST:$PORT" --workers "$WEB_WORKERS" --threads 4 --access-logfile "$DATA_DIR/logs/access.log" \
  "app:create_app()" >>"$DATA_DIR/logs/web.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
  "$PY" -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$PORT/health')" 2>/dev/null && break
  sleep 0.2
done
echo
echo "SAE Studio is running at http://$HOST:$PORT/"
echo "  data: $DATA_DIR   logs: $DATA_DIR/logs   Redis: port $REDIS_PORT (password in $pwfile)"
echo "  Ctrl-C stops the web server, the worker and Redis."
wait -n "${pids[@]}"
echo "A process exited; stopping the others (see $DATA_DIR/logs)."
