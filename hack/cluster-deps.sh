#!/usr/bin/env bash
# Debian packages the real single-node cluster and the image builds need, installed only when missing:
# containerd + runc (the node's runtime), the CNI plugins (pod networking), iptables (kube-proxy, the
# kubelet, our pod isolation), debootstrap (the local base image) and buildah (builds the Dockerfile
# without a daemon). Idempotent: a second run installs nothing and touches nothing.
set -euo pipefail
PACKAGES=(containerd runc containernetworking-plugins iptables debootstrap buildah)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
done
(( ${#missing[@]} == 0 )) && exit 0
# apt-get fails at once if another apt holds its lock; `make test` runs this in the background.
exec 9>/var/lock/pgwarden-cluster-deps.lock
flock 9
echo "[cluster-deps] installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
