#!/usr/bin/env bash
# Print the name of the image to build the stage image FROM, making it first when needed.
#
#   scripts/base-image.sh             # stdout: python:3.11-slim-bookworm, or the local stand-in's name
#
# In order: python:3.11-slim-bookworm when the engine has it or can pull it; else the local stand-in,
# made once from Debian's packages and then cached by the engine as an image:
#   debootstrap --variant=minbase bookworm, then python3.11 python3.11-venv python-is-python3
#   ca-certificates in the chroot, with this machine's CA certificates and pip configuration copied in
#   (so pip inside `docker build` reaches the package index the way pip here does), `docker import`.
# About 3 minutes on 2 cores, once. Needs root and debootstrap (installed with apt-get when missing).
set -euo pipefail

OFFICIAL=python:3.11-slim-bookworm
STANDIN=meshpipe/python:3.11-bookworm-debootstrap
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/meshpipe"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SECURITY_MIRROR="${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
PULL_TIMEOUT_S="${BASE_PULL_TIMEOUT_S:-30}"

fail() { echo "base-image: $*" >&2; exit 1; }
have() { docker image inspect "$1" >/dev/null 2>&1; }

have "$OFFICIAL" && { echo "$OFFICIAL"; exit 0; }
have "$STANDIN" && { echo "$STANDIN"; exit 0; }
if timeout "$PULL_TIMEOUT_S" docker pull -q "$OFFICIAL" >/dev/null 2>&1; then
  echo "$OFFICIAL"; exit 0
fi

mkdir -p "$CACHE"
exec 9>"$CACHE/base-image.lock"
flock 9
have "$STANDIN" && { echo "$STANDIN"; exit 0; }

[ "$(id -u)" = 0 ] || fail "$OFFICIAL cannot be pulled, and making a stand-in with debootstrap needs root"
if ! command -v debootstrap >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  { apt-get install -y -qq debootstrap || { apt-get update -qq && apt-get install -y -qq debootstrap; }; } \
    >"$CACHE/debootstrap-install.log" 2>&1 \
    || fail "$OFFICIAL cannot be pulled, and apt-get install debootstrap failed: see $CACHE/debootstrap-install.log"
fi

echo "base-image: $OFFICIAL cannot be pulled; making $STANDIN from Debian's packages (about 3 minutes)" >&2
started=$(date +%s)
root="$(mktemp -d "$CACHE/base-rootfs.XXXXXX")"
cleanup() {
  umount "$root/proc" 2>/dev/null || true
  rm -rf "$root"
}
trap cleanup EXIT

debootstrap --variant=minbase bookworm "$root" "$MIRROR" >"$CACHE/base-image.log" 2>&1 \
  || fail "debootstrap failed: see $CACHE/base-image.log"
cat >"$root/etc/apt/sources.list" <<SOURCES
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb $SECURITY_MIRROR bookworm-security main
SOURCES
cp /etc/resolv.conf "$root/etc/resolv.conf"
mount -t proc proc "$root/proc"
# This machine's CA certificates (a TLS-intercepting proxy's included) and pip configuration.
if [ -d /usr/local/share/ca-certificates ]; then
  mkdir -p "$root/usr/local/share/ca-certificates"
  cp -r /usr/local/share/ca-certificates/. "$root/usr/local/share/ca-certificates/"
fi
for conf in /etc/pip.conf /etc/xdg/pip/pip.conf; do
  if [ -f "$conf" ]; then mkdir -p "$root$(dirname "$conf")"; cp "$conf" "$root$conf"; fi
done
chroot "$root" /bin/sh -eu -c '
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends python3.11 python3.11-venv python-is-python3 ca-certificates
  update-ca-certificates
  apt-get clean
  rm -rf /var/lib/apt/lists/* /usr/share/doc/* /usr/share/man/* /usr/share/info/*
' >>"$CACHE/base-image.log" 2>&1 || fail "installing Python in the chroot failed: see $CACHE/base-image.log"
# The host's bundle wins where it holds more than update-ca-certificates made from the copied files.
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
umount "$root/proc"
: >"$root/etc/resolv.conf"

# pip's settings that come from this machine's environment travel as the image's environment.
changes=(--change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]')
for var in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_TRUSTED_HOST PIP_CERT PIP_CLIENT_CERT PIP_PROXY \
           PIP_DEFAULT_TIMEOUT PIP_TIMEOUT PIP_RETRIES; do
  if [ -n "${!var:-}" ]; then changes+=(--change "ENV $var=${!var}"); fi
done
tar -C "$root" -c . | docker import "${changes[@]}" - "$STANDIN" >/dev/null \
  || fail "docker import failed"
echo "base-image: made $STANDIN in $(( $(date +%s) - started )) s" >&2
echo "$STANDIN"
