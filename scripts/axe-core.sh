#!/usr/bin/env bash
# Installs axe-core (the accessibility rules the browser tests run inside Chromium) from
# npm into .cache/npm (gitignored), unless that version is there already. The browser
# tests call it; without npm or the registry they skip, saying so.
set -euo pipefail
cd "$(dirname "$0")/.."
version=4.14.1
target=.cache/npm/node_modules/axe-core
if [ -f "$target/axe.min.js" ] && grep -q "\"version\": \"$version\"" "$target/package.json"; then
  exit 0
fi
command -v npm >/dev/null 2>&1 || { echo "axe-core: npm not installed (Debian: apt-get install npm)" >&2; exit 1; }
npm install --prefix .cache/npm --no-audit --no-fund --no-save --silent "axe-core@$version" >&2
