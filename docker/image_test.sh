#!/usr/bin/env bash
# ./build.sh image-test: builds the CPU image of the product with podman (the same
# docker/Dockerfile.nvidia steps, on a Debian base) and serves the judge's contract from it
# (tests/image_check.py). Works on a machine that cannot pull images:
#   - podman, runc and debootstrap come from Debian's packages;
#   - the base is Debian 12 made by debootstrap and imported (localhost/debian:bookworm);
#   - runc, not crun (crun fails on hybrid cgroups); explicit ulimits (raising them is
#     refused inside the runtime); host network (apt and PyPI from inside a build);
#   - this machine's CA bundle and pip settings are mounted at build time only, never
#     written into the image.
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${IMAGE:-localhost/llm-triton:cpu}
BASE=localhost/debian:bookworm
log() { printf '[image-test] %s\n' "$*" >&2; }
started=$SECONDS

if ! command -v podman >/dev/null || ! command -v runc >/dev/null || ! command -v debootstrap >/dev/null; then
  log "installing podman, runc, debootstrap (Debian packages)"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO=sudo; fi
  $SUDO apt-get update -qq >/dev/null
  $SUDO apt-get install -y -qq podman runc debootstrap >/dev/null
fi
PODMAN=(podman --runtime /usr/sbin/runc)
LIMITS=(--ulimit nofile=1024:1024 --ulimit nproc=4096:4096)

if ! "${PODMAN[@]}" image exists "$BASE"; then
  rootfs=$(mktemp -d /tmp/llm-rootfs.XXXXXX)
  log "making $BASE with debootstrap (about a minute)"
  debootstrap --variant=minbase bookworm "$rootfs" http://deb.debian.org/debian >/dev/null
  tar -C "$rootfs" -c . | "${PODMAN[@]}" import - "$BASE" >/dev/null
  rm -rf "$rootfs"
fi

# Build-time access to this machine's package sources, as pip settings in a mount.
conf=$(mktemp -d /tmp/llm-image-conf.XXXXXX)
trap 'rm -rf "$conf"' EXIT
ca=/etc/ssl/certs/ca-certificates.crt
mounts=()
{
  echo "[global]"
  if [ -f "$ca" ]; then echo "cert = /etc/llm-build-ca.crt"; mounts+=(-v "$ca:/etc/llm-build-ca.crt:ro"); fi
  for dir in /opt/wheels; do
    if [ -d "$dir" ]; then echo "find-links = $dir"; mounts+=(-v "$dir:$dir:ro"); fi
  done
} > "$conf/pip.conf"
mounts+=(-v "$conf/pip.conf:/etc/pip.conf:ro")

log "building $IMAGE from docker/Dockerfile.nvidia (ENGINE=cpu, MODEL_ID=embedded)"
build_started=$SECONDS
"${PODMAN[@]}" build --format docker "${LIMITS[@]}" --network host "${mounts[@]}" \
  --ignorefile docker/Dockerfile.nvidia.dockerignore -f docker/Dockerfile.nvidia \
  --build-arg BASE_IMAGE="$BASE" --build-arg ENGINE=cpu --build-arg MODEL_ID=embedded \
  -t "$IMAGE" . 2>&1 | grep --line-buffered -v "^WARNING: Location 'file:" >&2
log "built in $((SECONDS - build_started)) s: $("${PODMAN[@]}" image inspect "$IMAGE" --format '{{.Size}}' | awk '{printf "%.1f GB", $1/1e9}')"

py=.venv/bin/python
[ -x "$py" ] || py=python3
"$py" -m tests.image_check --image "$IMAGE" --podman "${PODMAN[*]}" --ulimits "${LIMITS[*]}"
log "done in $((SECONDS - started)) s"
