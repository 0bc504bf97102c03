#!/usr/bin/env bash
# Runs Berth on this machine on PostgreSQL (for several processes or NATS; plain
# `berth up` needs no database, see the README): starts a local PostgreSQL when no
# BERTH_DATABASE_URL is given (installing it from Debian's packages if missing),
# migrates, and runs every role in one process (`berth up`). User servers run on the Docker engine when
# one answers, else as local processes (`BERTH_SPAWNER=auto`).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${BERTH_DATABASE_URL:-}" ]]; then
  if ! compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  fi
  version="$(ls /usr/lib/postgresql | sort -V | tail -1)"
  pg_lsclusters -h | awk '{print $1" "$2}' | grep -qx "$version main" || pg_createcluster "$version" main >/dev/null
  pg_ctlcluster "$version" main start 2>/dev/null || true
  for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 && break; sleep 1; done
  password="${BERTH_DB_PASSWORD:-berth-local}"
  runuser -u postgres -- psql -q -c "do \$\$ begin
    if not exists (select from pg_roles where rolname = 'berth') then
      create role berth login superuser password '$password';
    end if; end \$\$"
  runuser -u postgres -- psql -tAc "select 1 from pg_database where datname = 'berth'" | grep -q 1 \
    || runuser -u postgres -- createdb -O berth berth
  export BERTH_DATABASE_URL="postgres://berth:$password@127.0.0.1:5432/berth"
fi

if [[ -z "${BERTH_ADMIN_TOKEN:-}" ]]; then
  BERTH_ADMIN_TOKEN="$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  export BERTH_ADMIN_TOKEN
  echo "admin token (this run only): $BERTH_ADMIN_TOKEN"
fi

if [[ -z "${BERTH_ADMIN_USER:-}" ]]; then
  export BERTH_ADMIN_USER=admin
  BERTH_ADMIN_PASSWORD="$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  export BERTH_ADMIN_PASSWORD
  echo "dashboard login (this run only): admin / $BERTH_ADMIN_PASSWORD"
fi

cargo build --release --quiet
echo "dashboard on http://${BERTH_LISTEN:-127.0.0.1:8080}/admin"
echo "API on http://${BERTH_LISTEN:-127.0.0.1:8080}/api/v1 — try:"
echo "  curl -H \"Authorization: Bearer \$BERTH_ADMIN_TOKEN\" -X POST http://${BERTH_LISTEN:-127.0.0.1:8080}/api/v1/users/alice"
exec ./target/release/berth up "$@"
