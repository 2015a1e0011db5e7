#!/usr/bin/env bash
# Install the Debian packages SAE Studio needs when they are missing:
# redis-server and npm (which fetches htmx) always; with --browser (for the tests) also
# chromium and chromium-driver, and postgresql (the suite runs on PostgreSQL too).
set -euo pipefail
need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v npm >/dev/null || need+=(npm)
if [[ "${1:-}" == "--browser" ]]; then
  command -v chromium >/dev/null || need+=(chromium)
  command -v chromedriver >/dev/null || need+=(chromium-driver)
  command -v initdb >/dev/null || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || need+=(postgresql)
fi
[[ ${#need[@]} -eq 0 ]] && exit 0
echo "Installing system packages: ${need[*]}"
sudo=""
[[ $(id -u) -ne 0 ]] && sudo="sudo"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
