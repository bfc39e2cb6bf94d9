#!/usr/bin/env bash
# Build helm from its Go module at a pinned version, cached outside the checkout (like the control plane:
# hack/controlplane-build.sh). No wrapper module is needed: helm's go.mod has no replace directives, so
# `go install` of cmd/helm at a version works. Only cmd/helm is built, -trimpath, stripped; the version is
# stamped as helm's own Makefile does, so `helm version` reports the pin. A rebuild happens only when the
# pin changes (the cache key).
#
# Why Helm 3 (v3.22.0) rather than 4 (v4.3.1, also served): Helm 3 is what most clusters' tooling (CI
# images, GitOps controllers) still runs, and Helm 4 still installs apiVersion v2 charts; testing with the
# older major keeps the chart to what both take. PGWARDEN_HELM_VERSION may name another v3 release (the
# ldflags below are Helm 3's package paths).
#
# Usage: hack/helm-build.sh            -> prints the directory holding the helm binary
# Env:   PGWARDEN_HELM_VERSION (default v3.22.0),
#        PGWARDEN_CACHE (default /var/tmp/pgwarden-cache, as the Makefile and tests/harness/paths.py)
set -euo pipefail

HELM="${PGWARDEN_HELM_VERSION:-v3.22.0}"
CACHE="${PGWARDEN_CACHE:-/var/tmp/pgwarden-cache}"
BIN="$CACHE/helm/$HELM/bin"

log() { echo "[helm-build] $*" >&2; }

if [[ -x "$BIN/helm" ]]; then
  echo "$BIN"
  exit 0
fi

# One build at a time: `make test` starts the builds in the background while the first tiers run, and a
# test that needs these binaries meanwhile waits here for that build instead of starting a second one.
mkdir -p "$CACHE"
exec 9>"$CACHE/.helm-build.lock"
flock 9
if [[ -x "$BIN/helm" ]]; then
  echo "$BIN"
  exit 0
fi

mkdir -p "$BIN"
export CGO_ENABLED=0 GOFLAGS=-buildvcs=false GOTOOLCHAIN=local
module="helm.sh/helm/${HELM%%.*}" # helm.sh/helm/v3
start=$(date +%s)
log "building helm $HELM (first time only; a few minutes)"
# GOBIN is a scratch directory so a half-written binary never sits at the cached path.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
# The Kubernetes version `helm template`/`lint` assume without a server, from the client-go helm requires, as
# helm's Makefile derives it (client-go v0.37.x -> 1.37). Without it helm assumes 1.20 and refuses charts
# whose kubeVersion asks for more.
gomod=$(go mod download -json "$module@$HELM" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
k8s_minor=$(awk '$1 == "k8s.io/client-go" {split($2, v, "."); print v[2]}' "$gomod")
ldflags="-s -w -X $module/internal/version.version=$HELM -X $module/internal/version.gitTreeState=clean"
for pkg in pkg/lint/rules pkg/chartutil; do
  ldflags+=" -X $module/$pkg.k8sVersionMajor=1 -X $module/$pkg.k8sVersionMinor=$k8s_minor"
done
GOBIN="$scratch" go install -trimpath -ldflags "$ldflags" "$module/cmd/helm@$HELM"
mv "$scratch/helm" "$BIN/helm"
log "helm ready after $(($(date +%s) - start))s"
echo "$BIN"
