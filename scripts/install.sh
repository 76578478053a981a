#!/usr/bin/env bash
# Install what wsnic needs on Debian 12 (as root): system tools and a virtualenv in .venv.
# Usage: scripts/install.sh [--test | --bench]
#   --test adds the test and lint tools; --bench also a C compiler for bench/.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(iproute2 nftables libnftables1 iptables dnsmasq-base iperf procps python3 python3-venv)
test_packages=(busybox isc-dhcp-client openssl)
bench_packages=(gcc libc6-dev)
want=("${packages[@]}")
case "${1:-}" in
    --test) want+=("${test_packages[@]}") ;;
    --bench) want+=("${test_packages[@]}" "${bench_packages[@]}") ;;
esac

missing=()
for pkg in "${want[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing Debian packages: ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
extra=""
[ -n "${1:-}" ] && extra="[test]"
# The install is editable, so code changes need no reinstall; dependencies do. Reinstall only
# when pyproject.toml (or the extra) changed since the last install.
stamp=".venv/.wsnic-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1) ${extra}"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e ".${extra}"
    echo "$want" > "$stamp"
fi
