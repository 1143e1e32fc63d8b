#!/usr/bin/env bash
# etcd for the API-server tests comes from Debian's etcd-server package; installed once when missing.
set -euo pipefail
if command -v etcd >/dev/null; then echo "etcd: $(command -v etcd)"; exit 0; fi
if ! command -v apt-get >/dev/null; then
    echo "etcd: missing, and this is not a Debian-like system: install etcd >= 3.4 and put it on PATH" >&2; exit 1
fi
sudo=""
[[ $(id -u) -eq 0 ]] || sudo=sudo
echo "etcd: installing Debian's etcd-server"
$sudo apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends etcd-server >/dev/null \
    || { $sudo apt-get -o DPkg::Lock::Timeout=600 update >/dev/null \
         && $sudo apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends etcd-server >/dev/null; }
# The package's service would start a system etcd on the default ports; the tests start their own.
if command -v systemctl >/dev/null && systemctl is-active --quiet etcd 2>/dev/null; then $sudo systemctl stop etcd || true; fi
echo "etcd: $(etcd --version | head -1)"
