#!/usr/bin/env bash
# Installs what the client examples (examples/) need, into the project, and skips
# what is already there: psycopg 3 for Python (in .examples/python) and
# node-postgres for Node.js (examples/node/node_modules, from its lock file).
set -euo pipefail
cd "$(dirname "$0")/.."

PSYCOPG=3.3.9
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
command -v python3 >/dev/null || missing+=(python3)
python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
if ((${#missing[@]})); then
    echo "==> apt-get install ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -d ".examples/python/psycopg-$PSYCOPG.dist-info" ]; then
    echo "==> pip install psycopg[binary]==$PSYCOPG (into .examples/python)"
    rm -rf .examples/python
    python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore \
        --target .examples/python "psycopg[binary]==$PSYCOPG"
fi

wanted=$(sed -n 's/.*"pg": "\(.*\)".*/\1/p' examples/node/package.json)
installed=$(sed -n 's/^  "version": "\(.*\)".*/\1/p' examples/node/node_modules/pg/package.json 2>/dev/null || true)
if [ "$installed" != "$wanted" ]; then
    echo "==> npm ci (examples/node: pg $wanted)"
    npm ci --prefix examples/node --no-audit --no-fund --loglevel=error >/dev/null
fi
