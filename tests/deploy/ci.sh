#!/usr/bin/env bash
# .ci/run's deployment step, after `make test` (which made .venv): installs what the deployment
# checks need, renders and validates the Kubernetes manifests, then builds and runs the image.
#   bash tests/deploy/ci.sh        (as root)
set -euo pipefail
cd "$(dirname "$0")/../.."
export DEBIAN_FRONTEND=noninteractive
SECONDS=0

# Debian packages: podman, buildah and debootstrap for the image; kubectl for `kubectl
# kustomize` where the machine has none (Debian's is kubernetes-client; it would clash with a
# kubectl installed otherwise, so it is only added when there is none).
missing=()
for tool in podman buildah debootstrap; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ] || ! command -v kubectl >/dev/null; then
  timeout 600 apt-get update -q
  if ! command -v kubectl >/dev/null; then
    if apt-cache policy kubernetes-client | grep -q 'Candidate: [0-9]'; then
      missing+=(kubernetes-client)
    else
      echo "kubernetes-client is not available: the render tests will be skipped"
    fi
  fi
  if [ ${#missing[@]} -gt 0 ]; then
    timeout 900 apt-get install -y -q "${missing[@]}"
  fi
fi

# Manifests and Dockerfile, now with kubectl and the schemas: nothing may be skipped here.
log=$(mktemp)
.venv/bin/python -m pytest -q -p no:cacheprovider tests/deploy | tee "$log"
if command -v kubectl >/dev/null && grep -q '^SKIPPED' "$log"; then
  echo "deployment tests were skipped although kubectl and kubernetes-validate are installed"
  exit 1
fi
rm -f "$log"

# The image, built and run for real.
bash tests/deploy/container_test.sh
echo "deployment step: ${SECONDS} s"
