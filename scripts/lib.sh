# Shared by the scripts: where things live and how to run them. Source it; do not run it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The PostgreSQL the scripts build for and run: Debian's 15, or with CDE_PG_VERSION=16, 17 or 18
# the tree scripts/fetch-pg made (scripts/test-pg sets it).
PG_VERSION="${CDE_PG_VERSION:-15}"
if [ "$PG_VERSION" = 15 ]; then
    PG_BIN=/usr/lib/postgresql/15/bin
else
    PG_BIN="${CDE_PG_ROOT:-/opt/cde-pg}/$PG_VERSION/bin"
fi
PG_CONFIG="$PG_BIN/pg_config"
export CDE_PG_BIN="$PG_BIN"   # for tests/e2e
# The cluster scripts/regress, scripts/isolation and the e2e suite run against (scripts/cluster NAME).
CLUSTER="${CDE_CLUSTER:-test}"
PGRX_VERSION=0.18.0
export PATH="$HOME/.cargo/bin:$PATH"

# Cluster state lives in the project (.cde/), unless user postgres cannot reach the project
# (a checkout under /root, say): then in /tmp, under a name derived from the project path. Decided
# from the directories' permissions alone (postgres is not in root's groups, so it gets "other"
# rights): on a new machine neither user postgres nor sudo exists yet when this is sourced, and
# every script of one run must agree on the folder.
reachable_by_others() {
    local d="$1"
    while [ "$d" != "/" ] && [ -n "$d" ]; do
        [ $(( $(stat -c %a "$d") % 10 & 1 )) -eq 1 ] || return 1
        d="$(dirname "$d")"
    done
}
state_dir() {
    local d="$ROOT/.cde"
    if [ "$(id -u)" = 0 ] && ! reachable_by_others "$ROOT"; then
        d="/tmp/cde-state-$(printf %s "$ROOT" | md5sum | cut -c1-8)"
    fi
    printf %s "$d"
}
STATE="$(state_dir)"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

# Run a PostgreSQL server binary as the postgres user when we are root (PostgreSQL refuses root).
as_pg() {
    if [ "$(id -u)" = 0 ]; then sudo -u postgres "$@"; else "$@"; fi
}

# wait_for DESCRIPTION SECONDS COMMAND...: poll until COMMAND succeeds, or fail after SECONDS.
wait_for() {
    local what="$1" secs="$2"; shift 2
    local deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        if [ $SECONDS -ge $deadline ]; then echo "timed out after ${secs}s waiting for $what" >&2; return 1; fi
        sleep 0.2
    done
}
