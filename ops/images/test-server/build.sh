#!/usr/bin/env bash
# Builds berth-test-server:latest from Debian's busybox-static, without any registry.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
tag="${1:-berth-test-server:latest}"
busybox=/bin/busybox
if [[ ! -x "$busybox" ]]; then
  echo "busybox-static is missing: apt-get install busybox-static" >&2
  exit 1
fi
ctx="$(mktemp -d)"
trap 'rm -rf "$ctx"' EXIT
cp "$here/Dockerfile" "$ctx/"
cp "$busybox" "$ctx/busybox"
cp "$here/serve" "$ctx/serve"
printf 'root:x:0:0:root:/:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n' > "$ctx/passwd"
DOCKER_BUILDKIT=0 docker build --quiet -t "$tag" "$ctx" >/dev/null 2>&1 || docker build --quiet -t "$tag" "$ctx"
echo "built $tag"
