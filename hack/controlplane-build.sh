#!/usr/bin/env bash
# Build etcd, kube-apiserver and kubectl from their Go modules at pinned versions, cached outside the
# checkout. Why a wrapper module: k8s.io/kubernetes requires its staging modules at v0.0.0 with local
# replaces, so `go install` of it fails; a module that replaces each staging module with its published
# v0.<minor>.<patch> twin builds it. A rebuild happens only when a pin changes (the cache key).
#
# Usage: hack/controlplane-build.sh            -> prints the directory holding the three binaries
# Env:   PGWARDEN_K8S_VERSION (default v1.37.2), PGWARDEN_ETCD_VERSION (default v3.6.16),
#        PGWARDEN_CACHE (default /var/tmp/pgwarden-cache, as the Makefile and tests/harness/paths.py)
set -euo pipefail

K8S="${PGWARDEN_K8S_VERSION:-v1.37.2}"
ETCD="${PGWARDEN_ETCD_VERSION:-v3.6.16}"
CACHE="${PGWARDEN_CACHE:-/var/tmp/pgwarden-cache}"
OUT="$CACHE/controlplane/k8s-$K8S-etcd-$ETCD"
BIN="$OUT/bin"

log() { echo "[controlplane-build] $*" >&2; }

if [[ -x "$BIN/kube-apiserver" && -x "$BIN/etcd" && -x "$BIN/kubectl" ]]; then
  echo "$BIN"
  exit 0
fi

# One build at a time: `make test` starts the builds in the background while the first tiers run, and a
# test that needs these binaries meanwhile waits here for that build instead of starting a second one.
mkdir -p "$CACHE"
exec 9>"$CACHE/.controlplane-build.lock"
flock 9
if [[ -x "$BIN/kube-apiserver" && -x "$BIN/etcd" && -x "$BIN/kubectl" ]]; then
  echo "$BIN"
  exit 0
fi

mkdir -p "$BIN" "$OUT/src"
export CGO_ENABLED=0 GOFLAGS=-buildvcs=false GOTOOLCHAIN=local
minor_patch="${K8S#v1.}"           # e.g. 37.2
staging_version="v0.${minor_patch}" # e.g. v0.37.2
start=$(date +%s)

build_etcd() {
  local dir="$OUT/src/etcd"
  mkdir -p "$dir"
  cat >"$dir/main.go" <<'GO'
// Command etcd mirrors upstream server/main.go.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
  (cd "$dir" && rm -f go.mod go.sum && go mod init pgwarden.dev/etcd >/dev/null 2>&1 \
    && go get "go.etcd.io/etcd/server/v3@$ETCD" \
    && go mod tidy \
    && go build -trimpath -o "$BIN/etcd.tmp" . && mv "$BIN/etcd.tmp" "$BIN/etcd")
}

# Replace every staging module named in k8s.io/kubernetes' own go.mod with its published twin.
replace_staging() {
  local gomod
  gomod=$(go mod download -json "k8s.io/kubernetes@$K8S" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  local mods
  mods=$(grep -E '^\s*k8s\.io/[A-Za-z0-9._/-]+ => \./staging/' "$gomod" | awk '{print $1}')
  local m
  for m in $mods; do
    go mod edit "-replace=$m=$m@$staging_version"
  done
}

ldflags() {
  local pkg out=""
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    out+=" -X $pkg.gitVersion=$K8S -X $pkg.gitMajor=1 -X $pkg.gitMinor=${minor_patch%%.*}"
    out+=" -X $pkg.gitTreeState=clean"
  done
  echo "-s -w$out"
}

build_apiserver() {
  local dir="$OUT/src/kube-apiserver"
  mkdir -p "$dir"
  cat >"$dir/main.go" <<'GO'
// Command kube-apiserver mirrors upstream cmd/kube-apiserver/apiserver.go.
package main

import (
	"os"

	"k8s.io/component-base/cli"
	"k8s.io/kubernetes/cmd/kube-apiserver/app"
)

func main() {
	command := app.NewAPIServerCommand()
	os.Exit(cli.Run(command))
}
GO
  (cd "$dir" && rm -f go.mod go.sum && go mod init pgwarden.dev/kube-apiserver >/dev/null 2>&1 \
    && replace_staging \
    && go mod edit "-require=k8s.io/kubernetes@$K8S" \
    && go mod tidy \
    && go build -trimpath -ldflags "$(ldflags)" -o "$BIN/kube-apiserver.tmp" . \
    && mv "$BIN/kube-apiserver.tmp" "$BIN/kube-apiserver")
}

build_kubectl() {
  local dir="$OUT/src/kubectl"
  mkdir -p "$dir"
  cat >"$dir/main.go" <<'GO'
// Command kubectl mirrors upstream cmd/kubectl/kubectl.go.
package main

import (
	"k8s.io/component-base/cli"
	"k8s.io/kubectl/pkg/cmd"
	"k8s.io/kubectl/pkg/cmd/util"
)

func main() {
	command := cmd.NewDefaultKubectlCommand()
	if err := cli.RunNoErrOutput(command); err != nil {
		util.CheckErr(err)
	}
}
GO
  (cd "$dir" && rm -f go.mod go.sum && go mod init pgwarden.dev/kubectl >/dev/null 2>&1 \
    && go get "k8s.io/kubectl@$staging_version" "k8s.io/component-base@$staging_version" \
    && go mod tidy \
    && go build -trimpath -ldflags "$(ldflags)" -o "$BIN/kubectl.tmp" . \
    && mv "$BIN/kubectl.tmp" "$BIN/kubectl")
}

[[ -x "$BIN/etcd" ]] || { log "building etcd $ETCD (first time only)"; build_etcd; }
log "etcd ready after $(( $(date +%s) - start ))s"
[[ -x "$BIN/kube-apiserver" ]] || { log "building kube-apiserver $K8S (first time only; several minutes)"; build_apiserver; }
log "kube-apiserver ready after $(( $(date +%s) - start ))s"
[[ -x "$BIN/kubectl" ]] || { log "building kubectl $K8S (first time only)"; build_kubectl; }
log "kubectl ready after $(( $(date +%s) - start ))s"
echo "$BIN"
