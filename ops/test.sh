#!/usr/bin/env bash
# Runs Berth's whole test suite on a Debian machine, installing and starting what
# the tests need when it is missing: PostgreSQL, nats-server (JetStream), Debian's
# static busybox (for the locally built test image) and cargo-nextest. Needs a
# running Docker engine.
#
# BERTH_TEST_DATABASE_URL points the tests at another Postgres (a superuser URL:
# each test creates and drops its own database); then no local one is started.
# BERTH_TEST_NATS_URL does the same for NATS (each test uses its own stream).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*"; }

missing=()
compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null || missing+=(postgresql)
nats_server="$(command -v nats-server || echo /usr/sbin/nats-server)"
[[ -x "$nats_server" ]] || missing+=(nats-server)
if ! [[ -x /bin/busybox ]] || ldd /bin/busybox >/dev/null 2>&1; then missing+=(busybox-static); fi
# The dashboard's and the proxy's browser tests drive Debian's chromium through chromedriver.
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
# The README's example block is run as written: curl, as a newcomer pastes it.
command -v curl >/dev/null || missing+=(curl)
# The proxy's tests run a real Jupyter server, from PyPI into a venv.
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
if ((${#missing[@]})); then
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [[ -z "${BERTH_TEST_DATABASE_URL:-}" ]]; then
  log "starting PostgreSQL"
  version="$(ls /usr/lib/postgresql | sort -V | tail -1)"
  if ! pg_lsclusters -h | awk '{print $1" "$2}' | grep -qx "$version main"; then
    pg_createcluster "$version" main >/dev/null
  fi
  pg_ctlcluster "$version" main start 2>/dev/null || true
  for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
  pg_isready -h 127.0.0.1 -p 5432
  # Several worker processes per test, each with its own pool: room for them all.
  if [[ "$(runuser -u postgres -- psql -tAc 'show max_connections')" -lt 600 ]]; then
    runuser -u postgres -- psql -q -c "alter system set max_connections = 600"
    pg_ctlcluster "$version" main restart
    for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
  fi
  # A password for TCP logins of the local superuser; this cluster is for tests only.
  runuser -u postgres -- psql -q -c "alter user postgres password 'postgres'"
  export BERTH_TEST_DATABASE_URL="postgres://postgres:postgres@127.0.0.1:5432/postgres"
fi

# Tests that restart a broker start their own nats-server with this binary.
export BERTH_TEST_NATS_SERVER="$nats_server"
if [[ -z "${BERTH_TEST_NATS_URL:-}" ]]; then
  log "starting nats-server with JetStream"
  if ! (exec 3<>/dev/tcp/127.0.0.1/4222) 2>/dev/null; then
    store=/tmp/berth-test-nats
    mkdir -p "$store"
    nohup "$nats_server" --jetstream --store_dir "$store" --addr 127.0.0.1 --port 4222 \
      >"$store/server.log" 2>&1 &
    for _ in $(seq 1 30); do (exec 3<>/dev/tcp/127.0.0.1/4222) 2>/dev/null && break; sleep 0.5; done
  fi
  (exec 3<>/dev/tcp/127.0.0.1/4222) 2>/dev/null || { echo "nats-server did not start" >&2; exit 1; }
  export BERTH_TEST_NATS_URL="nats://127.0.0.1:4222"
fi

# A real Jupyter server (jupyter_server and ipykernel from PyPI) for the proxy's tests.
venv="${BERTH_TEST_VENV:-$HOME/.cache/berth-test-venv}"
if ! "$venv/bin/jupyter" server --version >/dev/null 2>&1; then
  log "installing jupyter_server and ipykernel into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check jupyter_server ipykernel
fi
export BERTH_TEST_JUPYTER="$venv/bin/jupyter"
# A real OpenID Connect provider (django-oauth-toolkit, ops/oidc/provider.py) for sign-in tests.
if ! "$venv/bin/python" -c 'import oauth2_provider' >/dev/null 2>&1; then
  log "installing django-oauth-toolkit into $venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check django-oauth-toolkit
fi
export BERTH_TEST_OIDC_PYTHON="$venv/bin/python"

log "checking the Docker engine"
docker info --format 'engine {{.ServerVersion}}, {{.Containers}} containers' \
  || { echo "the tests need a running Docker engine" >&2; exit 1; }

log "building the test image"
bash ops/images/test-server/build.sh

if ! cargo nextest --version >/dev/null 2>&1; then
  log "installing cargo-nextest"
  cargo install cargo-nextest --locked
fi

log "format and lints"
for component in rustfmt clippy; do
  cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1 || rustup component add "$component" >/dev/null 2>&1 || true
done
if cargo fmt --version >/dev/null 2>&1 && cargo clippy --version >/dev/null 2>&1; then
  cargo fmt --all --check
  cargo clippy --workspace --all-targets --quiet -- -D warnings
else
  echo "rustfmt or clippy is not installed and cannot be added here: format and lints NOT checked" >&2
fi

log "tests"
cargo nextest run --workspace --no-fail-fast "$@"

log "fuzzing the API against its OpenAPI document (Schemathesis)"
bash ops/fuzz/schemathesis.sh
