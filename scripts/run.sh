#!/usr/bin/env bash
# Start SAE Studio: a private Redis, one RQ worker and the web server. Ctrl-C stops all three.
set -euo pipefail
: "${DATA_DIR:?}" "${PORT:?}" "${REDIS_PORT:?}" "${PY:?}"
HOST="${HOST:-127.0.0.1}"
WEB_WORKERS="${WEB_WORKERS:-2}"
export DATA_DIR
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:${REDIS_PORT}/0}"
mkdir -p "$DATA_DIR/redis" "$DATA_DIR/logs"

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

if redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; then
  echo "Redis already answers on port $REDIS_PORT: using it"
else
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$DATA_DIR/redis" --save 60 1 \
    --daemonize no --logfile "$DATA_DIR/logs/redis.log" &
  pids+=($!)
  for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
  redis-cli -p "$REDIS_PORT" ping >/dev/null || { echo "Redis did not start; see $DATA_DIR/logs/redis.log"; exit 1; }
fi

"$PY" -m flask --app app init-db
"$PY" worker.py >>"$DATA_DIR/logs/worker.log" 2>&1 &
pids+=($!)
"$PY" -m gunicorn --bind "$HOST:$PORT" --workers "$WEB_WORKERS" --threads 4 --access-logfile "$DATA_DIR/logs/access.log" \
  "app:create_app()" >>"$DATA_DIR/logs/web.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
  "$PY" -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$PORT/')" 2>/dev/null && break
  sleep 0.2
done
echo
echo "SAE Studio is running at http://$HOST:$PORT/"
echo "  data: $DATA_DIR   logs: $DATA_DIR/logs   Redis: $REDIS_URL"
echo "  Ctrl-C stops the web server, the worker and Redis."
wait -n "${pids[@]}"
echo "A process exited; stopping the others (see $DATA_DIR/logs)."
