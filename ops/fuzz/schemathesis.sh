#!/usr/bin/env bash
# Schemathesis (PyPI) against Berth's own OpenAPI document: a fresh `berth up` on
# Postgres and one on the embedded store, each fuzzed as an admin and as a plain
# user. Passes when no answer is a server error and every answer matches the
# document (status, content type, headers, body). Seed and example count are fixed,
# so a run is repeatable and its time bounded (about a minute a store).
#
#   bash ops/fuzz/schemathesis.sh [postgres|embedded]...   (default: both)
#
# Postgres comes from BERTH_TEST_DATABASE_URL (ops/test.sh starts one).
set -euo pipefail
cd "$(dirname "$0")/../.."

venv="${BERTH_SCHEMATHESIS_VENV:-$HOME/.cache/berth-schemathesis}"
version=4.32.5
if ! "$venv/bin/schemathesis" --version 2>/dev/null | grep -q "$version"; then
  echo "== installing schemathesis $version into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$version"
fi

cargo build --quiet -p berth
berth="$PWD/target/debug/berth"
config="$PWD/ops/fuzz/schemathesis.toml"
stores=("$@")
[[ ${#stores[@]} -gt 0 ]] || stores=(postgres embedded)

work="$(mktemp -d /tmp/berth-fuzz.XXXXXX)"
pid=""
database=""
cleanup() {
  if [[ -n "$pid" ]]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  if [[ -n "$database" ]]; then
    psql -q "$BERTH_TEST_DATABASE_URL" -c "drop database if exists $database with (force)" || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

fuzz() { # store
  local store="$1" port admin_token base dir user_token failed=0
  port="$(free_port)"
  admin_token="fuzz-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  base="http://127.0.0.1:$port"
  dir="$work/$store"
  mkdir -p "$dir"
  local -a env=(BERTH_LISTEN="127.0.0.1:$port" BERTH_PUBLIC_URL="$base"
    BERTH_ADMIN_TOKEN="$admin_token" BERTH_SPAWNER=process BERTH_LOG_FORMAT=json)
  if [[ "$store" == postgres ]]; then
    : "${BERTH_TEST_DATABASE_URL:?set BERTH_TEST_DATABASE_URL (ops/test.sh does)}"
    database="berth_fuzz_$$"
    psql -q "$BERTH_TEST_DATABASE_URL" -c "create database $database"
    env+=(BERTH_DATABASE_URL="${BERTH_TEST_DATABASE_URL%/*}/$database")
  fi
  (cd "$dir" && exec env "${env[@]}" "$berth" up >"$dir/berth.log" 2>&1) &
  pid=$!
  for _ in $(seq 1 60); do curl -sf "$base/ready" >/dev/null && break; sleep 0.5; done
  curl -sf "$base/ready" >/dev/null || { tail -20 "$dir/berth.log"; return 1; }

  # A plain user with a session of their own.
  curl -sf -X POST "$base/api/v1/admin/users" -H "Authorization: Bearer $admin_token" \
    -d '{"username": "fuzz", "password": "fuzzing password 1"}' >/dev/null
  user_token="$(curl -sf -X POST "$base/api/v1/auth/login" \
    -d '{"username": "fuzz", "password": "fuzzing password 1"}' |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["access_token"])')"

  for who in admin user; do
    local token="$admin_token" report="$dir/$who" settings="$config"
    local -a only=()
    if [[ "$who" == user ]]; then
      token="$user_token"
      # Logging out or changing the password would end the session the run uses.
      only=(--exclude-path /api/v1/auth/logout --exclude-path /api/v1/auth/password)
      # Their own name in every path, so the run reaches their servers and jobs.
      settings="$dir/user.toml"
      { cat "$config"; printf '\n[parameters]\n"path.user" = "fuzz"\n'; } >"$settings"
    fi
    echo "== schemathesis: $store store, as $who"
    # From the run's own directory: Schemathesis keeps a cache where it runs.
    if ! (cd "$dir" && "$venv/bin/schemathesis" --no-color --config-file "$settings" run "$base/api/v1/openapi.json" \
      -H "Authorization: Bearer $token" "${only[@]}" \
      --report junit --report-dir "$report" >"$report.log" 2>&1); then
      failed=1
    fi
    grep -E "^(Test cases:|  [0-9]+ generated)|Failures:|❌|⚠️" "$report.log" || true
    if [[ "$failed" == 1 ]]; then
      echo "-- schemathesis found failures ($store, $who):"
      sed -n '/FAILURES/,/SUMMARY/p' "$report.log" | head -200
      break
    fi
  done

  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""
  if [[ -n "$database" ]]; then
    psql -q "$BERTH_TEST_DATABASE_URL" -c "drop database if exists $database with (force)"
    database=""
  fi
  return "$failed"
}

status=0
for store in "${stores[@]}"; do
  fuzz "$store" || status=1
done
exit "$status"
