#!/usr/bin/env bash
# Build prometheus and promtool from their Go module at a pinned version, cached outside the checkout,
# the way hack/controlplane-build.sh builds the control plane. The alert rules and the dashboard are
# tested with the real tools (tests/pg/test_monitoring.py, tests/unit/test_monitoring_rules.py).
#
# Lean on purpose (2 cores, CI's cold run has a budget): `remove_all_sd` drops every service-discovery
# plugin but file and http (prometheus/plugins/minimum.go; the tests scrape static targets), no web UI
# assets are embedded (`builtinassets` is not set: the HTTP API, which the tests use, needs none),
# -trimpath and -s -w. promtool still links discovery/kubernetes: it imports it directly.
# `go install pkg@version` works because Prometheus' go.mod has no replace directives.
#
# Usage: hack/prometheus-build.sh            -> prints the directory holding the two binaries
# Env:   PGWARDEN_PROMETHEUS_VERSION (default v0.316.0: the Go module version of Prometheus 3.16.0),
#        PGWARDEN_CACHE (default /var/tmp/pgwarden-cache, as the Makefile and tests/harness/paths.py)
set -euo pipefail

VERSION="${PGWARDEN_PROMETHEUS_VERSION:-v0.316.0}"
CACHE="${PGWARDEN_CACHE:-/var/tmp/pgwarden-cache}"
BIN="$CACHE/prometheus/$VERSION/bin"
TAGS="remove_all_sd"

log() { echo "[prometheus-build] $*" >&2; }

if [[ -x "$BIN/prometheus" && -x "$BIN/promtool" ]]; then
  echo "$BIN"
  exit 0
fi

# One build at a time: `make test` starts the builds in the background while the first tiers run, and a
# test that needs these binaries meanwhile waits here for that build instead of starting a second one.
mkdir -p "$CACHE"
exec 9>"$CACHE/.prometheus-build.lock"
flock 9
if [[ -x "$BIN/prometheus" && -x "$BIN/promtool" ]]; then
  echo "$BIN"
  exit 0
fi

mkdir -p "$BIN"
export CGO_ENABLED=0 GOFLAGS=-buildvcs=false GOTOOLCHAIN=local
# v0.316.0 -> 3.16.0: Prometheus tags its Go module v0.<major><minor>.<patch> (v0.305.1 is 3.5.1).
numbers="${VERSION#v0.}"
release="${numbers:0:1}.$((10#$(cut -d. -f1 <<<"${numbers:1}"))).${numbers#*.}"
ldflags="-s -w -X github.com/prometheus/common/version.Version=$release"
ldflags+=" -X github.com/prometheus/common/version.Branch=HEAD -X github.com/prometheus/common/version.Revision=$VERSION"
start=$(date +%s)
log "building prometheus and promtool $release ($VERSION, tags: $TAGS; first time only, several minutes)"
# Into a temporary GOBIN first, so an interrupted build never leaves a half-written binary in the cache.
tmp="$BIN.tmp.$$"
mkdir -p "$tmp"
trap 'rm -rf "$tmp"' EXIT
GOBIN="$tmp" go install -trimpath -tags "$TAGS" -ldflags "$ldflags" \
  "github.com/prometheus/prometheus/cmd/prometheus@$VERSION" \
  "github.com/prometheus/prometheus/cmd/promtool@$VERSION"
mv "$tmp/prometheus" "$tmp/promtool" "$BIN/"
log "prometheus and promtool ready after $(( $(date +%s) - start ))s"
echo "$BIN"
