#!/usr/bin/env bash
# Install the Debian packages SAE Studio needs when they are missing:
# redis-server and npm (which fetches htmx) always; chromium and chromium-driver with
# --browser (for the browser tests).
set -euo pipefail
need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v npm >/dev/null || need+=(npm)
if [[ "${1:-}" == "--browser" ]]; then
  command -v chromium >/dev/null || need+=(chromium)
  command -v chromedriver >/dev/null || need+=(chromium-driver)
fi
[[ ${#need[@]} -eq 0 ]] && exit 0
echo "Installing system packages: ${need[*]}"
sudo=""
[[ $(id -u) -ne 0 ]] && sudo="sudo"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
