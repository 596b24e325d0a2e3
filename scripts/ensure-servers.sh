#!/usr/bin/env bash
# Makes sure the servers the integration tests start are installed: PostgreSQL
# (initdb, postgres) and Redis (redis-server), and tmux, the terminal in which
# tests/test_inspect.py drives `python -m ferroloop top`. Installs them from Debian's
# packages when missing; the tests themselves start private instances on 127.0.0.1.
set -euo pipefail

have_postgres() {
    command -v initdb >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null
}
have_redis() {
    command -v redis-server >/dev/null 2>&1
}
have_tmux() {
    command -v tmux >/dev/null 2>&1
}

missing=()
have_postgres || missing+=(postgresql)
have_redis || missing+=(redis-server)
have_tmux || missing+=(tmux)
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "ensure-servers: ${missing[*]} missing and not root: install them, then rerun" >&2
    exit 1
fi
echo "ensure-servers: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# The packages' own services are not used (and may not start in a container).
service redis-server stop >/dev/null 2>&1 || true
service postgresql stop >/dev/null 2>&1 || true
