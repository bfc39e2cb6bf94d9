#!/usr/bin/env bash
# Debian packages the test suite needs beyond the machine's own, installed only when missing:
# libfaketime steps a test server's wall clock at run time (tests/pg/test_engine_trust.py: a clock step on
# the database host must not look like ageing). Idempotent: a second run installs nothing and touches nothing.
set -euo pipefail
PACKAGES=(libfaketime)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
done
(( ${#missing[@]} == 0 )) && exit 0
if (( EUID != 0 )); then
  echo "[test-deps] missing Debian packages: ${missing[*]} (run: sudo apt-get install ${missing[*]})" >&2
  exit 1
fi
echo "[test-deps] installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
