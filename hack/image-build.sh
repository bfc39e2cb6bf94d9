#!/usr/bin/env bash
# Build the images the real single-node cluster runs, without a registry or a Docker daemon, and load
# them into the node's containerd (when it runs). Why buildah: it executes a Dockerfile as Docker does
# (stages, COPY --from, USER, ENTRYPOINT) yet needs no daemon; `--isolation chroot` suits machines where
# nested namespaces are limited. The only thing that cannot come from a registry here is a base image, so
# one is made with debootstrap from the Debian mirror apt already uses, and the project's Dockerfile is
# built with its BASE build argument pointing at that (upstream keeps the official slim Python default).
#
# Usage: hack/image-build.sh [pgwarden|postgres|postgres18|pause|all]...     (default: all)
# Images: localhost/pgwarden:dev (the project's Dockerfile), localhost/postgres:15 (Debian's
#         postgresql-15, images/postgres/Containerfile), localhost/postgres:18 (the relocatable build
#         tests/pg use, images/postgres/Containerfile.relocatable), localhost/pause:pgwarden (the sandbox).
# Env:    PGWARDEN_CACHE (default /var/tmp/pgwarden-cache): buildah's storage and the image archives live
#         in $PGWARDEN_CACHE/images; CLUSTER_CONTAINERD (socket; default the one `make cluster` runs).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
CACHE="${PGWARDEN_CACHE:-/var/tmp/pgwarden-cache}"
OUT="$CACHE/images"
SOCK="${CLUSTER_CONTAINERD:-/run/pgwarden-cluster/containerd.sock}"
SUITE=bookworm
DEBIAN_BASE="localhost/pgwarden-base/debian:$SUITE"
PYTHON_BASE="localhost/pgwarden-base/python:3.11-$SUITE"
mkdir -p "$OUT"
# One build at a time: `make test` builds the images in the background, and the cluster tier waits on this
# lock (tests/cluster/conftest.py) so it never loads an image half written or one about to be replaced.
exec 9>"$OUT/.build.lock"
flock 9

log() { echo "[image-build] $*" >&2; }
# buildah keeps its layers in the cache, not in /var/lib/containers, so removing the cache removes it all.
bah() { buildah --root "$OUT/storage" --runroot "$OUT/run" "$@"; }
have() { bah inspect --type image "$1" >/dev/null 2>&1; }

# The deb822 stanza of apt's own sources that serves the suite itself (not -security/-updates).
debian_mirror() {
  python3 - "$SUITE" <<'PY'
import glob, sys
suite = sys.argv[1]
for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    for stanza in open(path).read().split("\n\n"):
        fields = dict(line.split(":", 1) for line in stanza.splitlines() if ":" in line and not line.startswith("#"))
        if suite in fields.get("Suites", "").split() and "main" in fields.get("Components", "").split():
            print(fields["URIs"].split()[0]); sys.exit(0)
for line in open("/etc/apt/sources.list") if glob.glob("/etc/apt/sources.list") else []:
    words = line.split()
    if len(words) >= 4 and words[0] == "deb" and words[2] == suite:
        print(words[1]); sys.exit(0)
sys.exit("no apt source for " + suite)
PY
}

# A minimal Debian made by debootstrap, imported as a one-layer image: the root of every local image.
debian_base() {
  have "$DEBIAN_BASE" && return
  local tree="$OUT/debootstrap-$SUITE" tarball="$OUT/debian-$SUITE.tar" started=$SECONDS
  if [[ ! -f "$tarball" ]]; then
    rm -rf "$tree"
    log "debootstrap --variant=minbase $SUITE (first time only)"
    nice -n 19 debootstrap --variant=minbase "$SUITE" "$tree" "$(debian_mirror)" >"$OUT/debootstrap.log" 2>&1 \
      || { tail -20 "$OUT/debootstrap.log" >&2; exit 1; }
    rm -rf "$tree"/var/cache/apt/archives/*.deb "$tree"/var/lib/apt/lists/*
    tar --numeric-owner -C "$tree" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
    rm -rf "$tree"
  fi
  local ctr
  ctr=$(bah from scratch)
  bah add "$ctr" "$tarball" / >/dev/null
  bah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd /bin/bash "$ctr"
  bah commit --quiet "$ctr" "$DEBIAN_BASE" >/dev/null
  bah rm "$ctr" >/dev/null
  log "$DEBIAN_BASE ready after $((SECONDS - started))s"
}

bud() {
  # --force-rm: a failed step leaves no container (nor its overlay mount) behind.
  nice -n 19 buildah --root "$OUT/storage" --runroot "$OUT/run" bud --isolation chroot --layers --force-rm "$@"
}

# The project's Dockerfile's RUN steps see the host's CA bundle (read-only, never in a layer): where egress
# goes through a proxy with its own CA, pip inside the build must trust what the host trusts. Only there:
# an image whose build installs Debian's ca-certificates (the Python base) must own that file, or its
# post-install script fails to replace it ("Device or resource busy"). apt needs no CA: the mirror is
# the one apt on this host uses.
bud_trusting_host() {
  bud --volume "$CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro" "$@"
}
CA_BUNDLE="${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}"

python_base() {
  have "$PYTHON_BASE" && return
  debian_base
  bud --build-arg "BASE=$DEBIAN_BASE" -t "$PYTHON_BASE" -f "$REPO/images/python/Containerfile" "$REPO/images/python"
}

# Save an image as a docker-archive (tags survive `ctr import`) and load it into the node's containerd.
export_and_load() {
  local image=$1 file="$OUT/$2.tar"
  rm -f "$file.tmp"
  bah push --quiet "$image" "docker-archive:$file.tmp:$image" >/dev/null
  mv "$file.tmp" "$file"  # `make cluster` imports every archive here: never a half-written one
  if [[ -S "$SOCK" ]]; then
    ctr --address "$SOCK" -n k8s.io images import --no-unpack=false "$file" >/dev/null
    log "$image loaded into the cluster's containerd"
  else
    log "$image saved to $file (no cluster running: \`make cluster\` loads it)"
  fi
}

build_pgwarden() {
  python_base
  local started=$SECONDS
  # The project's own Dockerfile, unchanged; only its base comes from here.
  bud_trusting_host --build-arg "BASE=$PYTHON_BASE" -t localhost/pgwarden:dev -f "$REPO/Dockerfile" "$REPO"
  export_and_load localhost/pgwarden:dev pgwarden-dev
  log "localhost/pgwarden:dev built and loaded in $((SECONDS - started))s"
}

build_postgres() {
  debian_base
  local started=$SECONDS
  bud --build-arg "BASE=$DEBIAN_BASE" --build-arg PG_MAJOR=15 -t localhost/postgres:15 \
    -f "$REPO/images/postgres/Containerfile" "$REPO/images/postgres"
  export_and_load localhost/postgres:15 postgres-15
  log "localhost/postgres:15 built and loaded in $((SECONDS - started))s"
}

# PostgreSQL 18 is not packaged for bookworm: the relocatable build the pg tests use (fetched once by
# tests/harness/pgbinaries.py into the cache), copied into a build context of its own.
build_postgres18() {
  debian_base
  local started=$SECONDS context="$OUT/context-postgres-18" pgdir
  local py=python3
  [[ -x "$REPO/.venv/bin/python" ]] && py="$REPO/.venv/bin/python"
  pgdir=$(cd "$REPO" && "$py" -c \
    'from tests.harness.pgbinaries import bindir; print(bindir("18").parent)' 2>/dev/null) \
    || pgdir=$(ls -d "$CACHE"/postgresql/18.* | tail -1)
  rm -rf "$context" && mkdir -p "$context"
  cp -a "$pgdir" "$context/pg"
  cp "$REPO/images/postgres/entrypoint.sh" "$context/"
  bud --build-arg "BASE=$DEBIAN_BASE" --build-arg PG_MAJOR=18 -t localhost/postgres:18 \
    -f "$REPO/images/postgres/Containerfile.relocatable" "$context"
  rm -rf "$context"
  export_and_load localhost/postgres:18 postgres-18
  log "localhost/postgres:18 built and loaded in $((SECONDS - started))s"
}

build_pause() {
  local bin started=$SECONDS
  bin=$(bash "$HERE/cluster-build.sh")
  if ! have localhost/pause:pgwarden; then
    local ctr
    ctr=$(bah from scratch)
    bah copy "$ctr" "$bin/pause" /pause >/dev/null
    bah config --entrypoint '["/pause"]' --user 65535:65535 "$ctr"
    bah commit --quiet "$ctr" localhost/pause:pgwarden >/dev/null
    bah rm "$ctr" >/dev/null
  fi
  export_and_load localhost/pause:pgwarden pause
  log "localhost/pause:pgwarden ready in $((SECONDS - started))s"
}

targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(all)
for target in "${targets[@]}"; do
  case "$target" in
    pgwarden) build_pgwarden ;;
    postgres) build_postgres ;;
    postgres18) build_postgres18 ;;
    pause) build_pause ;;
    all) build_pause; build_postgres; build_postgres18; build_pgwarden ;;
    *) echo "unknown image: $target" >&2; exit 2 ;;
  esac
done
