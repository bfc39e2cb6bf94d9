#!/usr/bin/env bash
# Build the node components of the real single-node cluster (kubelet, kube-proxy, kube-scheduler,
# kube-controller-manager) plus a tiny pod-sandbox ("pause") program, cached outside the checkout next to
# the control plane. Why another wrapper module: k8s.io/kubernetes requires its staging modules at v0.0.0
# with local replaces; the control-plane build already derived the replaces that make it buildable
# (hack/controlplane-build.sh), so this module starts from that go.mod and go.sum. One `go build` links
# all four commands, sharing the Go build cache. Everything runs under `nice -n 19`: the machines' cores
# are shared.
#
# Usage: hack/cluster-build.sh      -> prints the directory holding the node binaries
# Env:   PGWARDEN_K8S_VERSION (default v1.37.2), PGWARDEN_ETCD_VERSION, PGWARDEN_CACHE as the control plane.
set -euo pipefail

K8S="${PGWARDEN_K8S_VERSION:-v1.37.2}"
ETCD="${PGWARDEN_ETCD_VERSION:-v3.6.16}"
CACHE="${PGWARDEN_CACHE:-/var/tmp/pgwarden-cache}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="$CACHE/cluster/k8s-$K8S"
BIN="$OUT/bin"
CMDS=(kubelet kube-proxy kube-scheduler kube-controller-manager)

log() { echo "[cluster-build] $*" >&2; }

have_all() {
  local c
  for c in "${CMDS[@]}" pause; do [[ -x "$BIN/$c" ]] || return 1; done
}

if have_all; then
  echo "$BIN"
  exit 0
fi

# One build at a time (as hack/controlplane-build.sh): `make test` builds this in the background, and the
# cluster tier waits here for that build instead of starting a second one.
mkdir -p "$CACHE"
exec 9>"$CACHE/.cluster-build.lock"
flock 9
if have_all; then
  echo "$BIN"
  exit 0
fi

start=$(date +%s)
# The control plane first: its wrapper module's go.mod is where the replaces come from.
CP_BIN=$(nice -n 19 bash "$HERE/controlplane-build.sh")
CP_SRC="$(dirname "$CP_BIN")/src/kube-apiserver"
mkdir -p "$BIN" "$OUT/src/node"
export CGO_ENABLED=0 GOFLAGS=-buildvcs=false GOTOOLCHAIN=local
minor_patch="${K8S#v1.}"

ldflags() {
  local pkg out=""
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    out+=" -X $pkg.gitVersion=$K8S -X $pkg.gitMajor=1 -X $pkg.gitMinor=${minor_patch%%.*}"
    out+=" -X $pkg.gitTreeState=clean"
  done
  echo "-s -w$out"
}

# main.go of each command: the same three registrations upstream's mains make, then the cobra command.
write_main() {
  local name=$1 ctor=$2 extra=${3:-}
  mkdir -p "$OUT/src/node/cmd/$name"
  cat >"$OUT/src/node/cmd/$name/main.go" <<GO
// Command $name runs k8s.io/kubernetes/cmd/$name/app like the upstream binary.
package main

import (
	"os"
$extra
	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	"k8s.io/kubernetes/cmd/$name/app"
)

func main() {
	os.Exit(cli.Run(app.$ctor))
}
GO
}

build_node() {
  local dir="$OUT/src/node"
  write_main kubelet "NewKubeletCommand(context.Background())" '	"context"'
  write_main kube-proxy "NewProxyCommand()"
  write_main kube-scheduler "NewSchedulerCommand()"
  write_main kube-controller-manager "NewControllerManagerCommand()" '	_ "time/tzdata"'
  sed 's#^module .*#module pgwarden.dev/node#' "$CP_SRC/go.mod" >"$dir/go.mod"
  cp "$CP_SRC/go.sum" "$dir/go.sum"
  (cd "$dir" && nice -n 19 go mod tidy \
    && nice -n 19 go build -trimpath -ldflags "$(ldflags)" -o "$OUT/build.tmp/" ./cmd/... )
  local c
  for c in "${CMDS[@]}"; do mv "$OUT/build.tmp/$c" "$BIN/$c"; done
  rmdir "$OUT/build.tmp"
}

# The pod sandbox image's only program: hold the pod's namespaces until told to stop.
build_pause() {
  local dir="$OUT/src/pause"
  mkdir -p "$dir"
  cat >"$dir/main.go" <<'GO'
// Command pause holds a pod's namespaces open until SIGTERM or SIGINT, then exits 0.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	<-stop
}
GO
  (cd "$dir" && rm -f go.mod && go mod init pgwarden.dev/pause >/dev/null 2>&1 \
    && nice -n 19 go build -trimpath -ldflags "-s -w" -o "$BIN/pause.tmp" . && mv "$BIN/pause.tmp" "$BIN/pause")
}

[[ -x "$BIN/pause" ]] || build_pause
missing=0
for c in "${CMDS[@]}"; do [[ -x "$BIN/$c" ]] || missing=1; done
if (( missing )); then
  log "building ${CMDS[*]} $K8S (first time only; several minutes)"
  build_node
fi
log "node binaries ready after $(( $(date +%s) - start ))s"
echo "$BIN"
