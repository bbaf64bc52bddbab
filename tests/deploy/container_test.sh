#!/usr/bin/env bash
# The Dockerfile for real, without a Docker engine or a registry: build a Debian bookworm base
# with debootstrap, build the image on it with podman (chroot isolation), start the server from
# the image with buildah, get a prediction over HTTP on loopback, stop it with SIGTERM.
#
#   bash tests/deploy/container_test.sh          (as root; .ci/run's deployment step runs it)
#
# Needs: root, podman, buildah, debootstrap (tests/deploy/ci.sh installs them), network to the
# Debian mirror and PyPI. Every wait has a time limit. State lives in $OFFRAMP_CONTAINER_WORK
# (default /tmp/offramp-container): the image store (so a rerun reuses the base image and the
# cached layers) and, while it is made, the base rootfs. Start over: rm -rf that folder.
#
# Environment: OFFRAMP_IMAGE_MAX_MB (450): the size the runtime image must not exceed;
# OFFRAMP_DEBIAN_MIRROR; OFFRAMP_STORAGE_DRIVER (overlay, or vfs where overlay cannot mount).
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$(pwd)

WORK=${OFFRAMP_CONTAINER_WORK:-/tmp/offramp-container}
MAX_MB=${OFFRAMP_IMAGE_MAX_MB:-450}
MIRROR=${OFFRAMP_DEBIAN_MIRROR:-http://deb.debian.org/debian}
DRIVER=${OFFRAMP_STORAGE_DRIVER:-overlay}
BASE=localhost/offramp-base:bookworm
IMAGE=localhost/offramp:ci
PY=python3  # the host's, for the HTTP checks (standard library only)
STORE=(--root "$WORK/storage" --runroot "$WORK/run" --storage-driver "$DRIVER")
PODMAN=(podman "${STORE[@]}" --cgroup-manager cgroupfs --events-backend file)
BUILDAH=(buildah "${STORE[@]}")
LOG="$WORK/server.log"
CTR=""
RUN_PID=""

say() { printf '[container-test %s +%ss] %s\n' "$(date +%T)" "$SECONDS" "$*"; }
fail() { say "FAILED: $*"; exit 1; }

[ "$(id -u)" = 0 ] || fail "needs root (debootstrap, podman and buildah with chroot isolation)"
for tool in podman buildah debootstrap tar ps "$PY"; do
  command -v "$tool" >/dev/null || fail "$tool is not installed (tests/deploy/ci.sh installs it)"
done
mkdir -p "$WORK"
chmod 755 "$WORK"

descendants() {  # every process below $1, deepest last
  local child
  for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do
    echo "$child"
    descendants "$child"
  done
}

unmount_under() {  # whatever a failed debootstrap left mounted below $1
  local target
  for target in $(awk -v root="$1/" 'index($2, root) == 1 {print $2}' /proc/mounts | sort -r); do
    umount -l "$target" 2>/dev/null || true
  done
}

cleanup() {
  local status=$?
  if [ -n "$RUN_PID" ] && kill -0 "$RUN_PID" 2>/dev/null; then
    local pids
    pids=$(descendants "$RUN_PID")
    kill -KILL $pids "$RUN_PID" 2>/dev/null || true
    wait "$RUN_PID" 2>/dev/null || true
  fi
  if [ -n "$CTR" ]; then
    timeout 60 "${BUILDAH[@]}" rm "$CTR" >/dev/null 2>&1 || true
  fi
  if [ -d "$WORK/rootfs" ]; then
    unmount_under "$WORK/rootfs"
    rm -rf --one-file-system "$WORK/rootfs"
  fi
  if [ "$status" != 0 ] && [ -s "$LOG" ]; then
    say "server log (last 40 lines):"
    tail -n 40 "$LOG"
  fi
  say "done, exit $status"
}
trap cleanup EXIT

# --- 1. the base image: Debian bookworm (python3 3.11, venv, CA certificates) --------------------
if "${PODMAN[@]}" image exists "$BASE"; then
  say "base image $BASE: reused from $WORK/storage"
else
  ROOTFS="$WORK/rootfs"
  unmount_under "$ROOTFS"
  rm -rf --one-file-system "$ROOTFS"
  say "debootstrap bookworm (minbase + python3, python3-venv, ca-certificates) from $MIRROR"
  timeout 900 debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$ROOTFS" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -n 30 "$WORK/debootstrap.log"; fail "debootstrap"; }
  unmount_under "$ROOTFS"
  # Slim it the way the official slim images are: no apt caches, docs (copyright files stay),
  # manual pages or message catalogues.
  rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/debootstrap \
    "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/*
  find "$ROOTFS"/usr/share/doc -type f ! -name copyright -delete
  find "$ROOTFS"/usr/share/locale -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
  say "import the rootfs as $BASE"
  tar -C "$ROOTFS" --numeric-owner -c . | timeout 600 "${PODMAN[@]}" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' - "$BASE" >/dev/null
  rm -rf --one-file-system "$ROOTFS"
fi

# --- 2. build: the Dockerfile's default (runtime) target on that base ---------------------------
# The host's CA store is mounted into RUN steps so that pip trusts what the host trusts;
# docker format keeps the HEALTHCHECK (OCI images have none).
say "podman build --target runtime (BASE_IMAGE=$BASE)"
build_start=$SECONDS
timeout 1800 "${PODMAN[@]}" build --isolation chroot --format docker --pull=never \
  -v /etc/ssl/certs:/etc/ssl/certs:ro \
  --build-arg BASE_IMAGE="$BASE" --target runtime -t "$IMAGE" -f Dockerfile . \
  >"$WORK/build.log" 2>&1 || { tail -n 60 "$WORK/build.log"; fail "podman build"; }
say "built $IMAGE in $((SECONDS - build_start)) s"
"${PODMAN[@]}" image prune -f >/dev/null 2>&1 || true  # earlier builds' images; the layer cache stays

inspect() { "${PODMAN[@]}" image inspect --format "$1" "$IMAGE"; }
size=$(inspect '{{.Size}}')
size_mb=$((size / 1000000))
say "image size: $size_mb MB ($((size / 1048576)) MiB, $size bytes); limit $MAX_MB MB"
[ "$size_mb" -le "$MAX_MB" ] || fail "the image is $size_mb MB, over $MAX_MB MB"

user=$(inspect '{{.Config.User}}')
cmd=$(inspect '{{json .Config.Cmd}}')
health=$(inspect '{{json .HealthCheck}}')
say "image config: user=$user cmd=$cmd healthcheck=$health"
case "${user%%:*}" in ''|0|root) fail "the image runs as root ($user)";; esac
[[ "$health" == *"/health/ready"* ]] || fail "no HEALTHCHECK on /health/ready in the image"
mapfile -t CMD < <(printf '%s' "$cmd" | "$PY" -c 'import json, sys; print("\n".join(json.load(sys.stdin)))')
[ "${#CMD[@]}" -ge 1 ] || fail "the image has no exec-form CMD"

# --- 3. a container from the image; what is (not) in it ------------------------------------------
CTR=$(timeout 120 "${BUILDAH[@]}" from --pull=never --name "offramp-ci-$$" "$IMAGE")
say "container $CTR"
crun() { timeout 120 "${BUILDAH[@]}" run --isolation chroot "$CTR" -- "$@"; }
uid=$(crun id -u)
[ "$uid" != 0 ] || fail "the container runs as root"
crun python3 -c '
import importlib.util as u, shutil, sys
found = [m for m in ("torch", "transformers", "pip") if u.find_spec(m)]
found += [c for c in ("gcc", "cc", "g++", "c++", "make") if shutil.which(c)]
sys.exit("in the runtime image: " + ", ".join(found) if found else 0)
' || fail "the runtime image holds build tools or training packages"
say "runs as uid $uid; no torch, transformers, pip or compilers in the image"

# --- 4. the models: the image's own bundles, else a tiny one mounted on /models -------------------
MOUNT=()
if find models -mindepth 2 -maxdepth 3 -name manifest.json 2>/dev/null | grep -q .; then
  say "serving the bundles the image ships: $(cd models && find . -mindepth 2 -maxdepth 3 -name manifest.json | sed 's|^\./||; s|/manifest.json||' | tr '\n' ' ')"
else
  [ -x .venv/bin/python ] || fail "models/ holds no bundle and there is no .venv to train a tiny one (run make test first)"
  say "models/ holds no bundle: training a tiny one and mounting it on /models"
  rm -rf "$WORK/models"
  mkdir -p "$WORK/models"
  timeout 900 .venv/bin/python -m tests.deploy.tiny_bundle "$WORK/models" >"$WORK/tiny_bundle.log" 2>&1 \
    || { tail -n 30 "$WORK/tiny_bundle.log"; fail "training the tiny bundle"; }
  chmod -R a+rX "$WORK/models"
  MOUNT=(-v "$WORK/models:/models:ro")
fi

# --- 5. serve: the image's CMD, on a free loopback port ------------------------------------------
# The chroot-isolated container shares the host's network: no port mapping, so it listens on a
# free port of the host's loopback (the image's own default is 0.0.0.0:8000).
PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
URL="http://127.0.0.1:$PORT"
timeout 60 "${BUILDAH[@]}" config --env OFFRAMP_PORT="$PORT" --env OFFRAMP_HOST=127.0.0.1 "$CTR"
say "start: ${CMD[*]} on $URL"
"${BUILDAH[@]}" run --isolation chroot "${MOUNT[@]}" "$CTR" -- "${CMD[@]}" >"$LOG" 2>&1 &
RUN_PID=$!

ready_start=$SECONDS
until "$PY" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + "/health/ready", timeout=2)' "$URL" 2>/dev/null; do
  kill -0 "$RUN_PID" 2>/dev/null || fail "the server exited before it was ready"
  [ $((SECONDS - ready_start)) -lt 180 ] || fail "not ready within 180 s"
  sleep 1
done
say "ready after $((SECONDS - ready_start)) s"

"$PY" - "$URL" <<'EOF' || fail "prediction"
import json
import sys
import urllib.request

url = sys.argv[1]
models = json.load(urllib.request.urlopen(url + "/v1/models", timeout=10))["models"]
default = next(m for m in models if m["default"])
texts = ["a gripping, beautifully acted film", "two hours I will never get back"]
if default["text_pair"]:
    texts = [[t, t] for t in texts]
request = urllib.request.Request(f"{url}/v1/models/{default['name']}/predict",
                                 data=json.dumps({"inputs": texts}).encode(),
                                 headers={"content-type": "application/json"})
body = json.load(urllib.request.urlopen(request, timeout=30))
predictions = body["predictions"]
assert len(predictions) == len(texts), body
for p in predictions:
    assert p["label"] in default["labels"], (p, default["labels"])
    assert 1 <= p["exit_layer"] <= default["layers"], p
print(f"prediction from {default['name']} (labels {default['labels']}): "
      + ", ".join(f"{p['label']} {p['score']:.2f} exit {p['exit_layer']}" for p in predictions))
EOF

# --- 6. stop: SIGTERM to the server, which must drain and exit 0 ---------------------------------
server=""
for pid in $(descendants "$RUN_PID"); do
  if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "offramp serve"; then server=$pid; fi
done
[ -n "$server" ] || fail "no server process under buildah run $RUN_PID"
say "SIGTERM to the server (pid $server)"
kill -TERM "$server"
stop_start=$SECONDS
while kill -0 "$RUN_PID" 2>/dev/null; do
  [ $((SECONDS - stop_start)) -lt 60 ] || fail "the server did not stop within 60 s of SIGTERM"
  sleep 0.5
done
status=0
wait "$RUN_PID" || status=$?
RUN_PID=""
# uvicorn shuts down gracefully on SIGTERM, then raises the signal again so that the process ends
# the way its parent expects (killed by SIGTERM, 143 under Docker and Kubernetes); buildah run
# reports that as 1. Either way the log must show the graceful end.
grep -q "Application shutdown complete" "$LOG" && grep -q "Finished server process" "$LOG" \
  || fail "no graceful shutdown after SIGTERM (buildah run exited $status)"
say "stopped gracefully in $((SECONDS - stop_start)) s (buildah run exit $status)"
say "PASSED: image $IMAGE, $size_mb MB, served a prediction, stopped cleanly (total ${SECONDS} s)"
echo "container: 1 passed, 0 failed"
