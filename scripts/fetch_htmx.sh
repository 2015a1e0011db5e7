#!/usr/bin/env bash
# Put htmx into static/ from the npm registry (the app never loads it from a CDN).
set -euo pipefail
version="$1"; dest="$2"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "htmx.org@$version" >/dev/null)
tar -xzf "$tmp"/htmx.org-"$version".tgz -C "$tmp"
mkdir -p "$(dirname "$dest")"
cp "$tmp/package/dist/htmx.min.js" "$dest"
echo "htmx $version installed at $dest"
