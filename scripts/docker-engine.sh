#!/usr/bin/env bash
# Make sure a Docker engine answers `docker info`; on Debian, install and start one if none does.
#
#   scripts/docker-engine.sh          # exit 0 once `docker info` answers; else one line on stderr, exit 1
#
# What it takes where no engine runs (root on Debian/Ubuntu):
#   apt-get install docker.io         # dockerd, containerd, runc
#   dockerd &                         # in the background, log in $CACHE/dockerd.log
# A machine whose engine is managed otherwise (Docker Desktop, systemd) is used as it is.
set -euo pipefail

CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/meshpipe"
WAIT_S="${DOCKER_ENGINE_WAIT_S:-60}"

PIDFILE=/var/run/docker.pid
CONTAINERD_PIDFILE=/var/run/docker/containerd/containerd.pid

answers() { docker info >/dev/null 2>&1; }
# The pid in pid file $1 if it is a live process named $2 (not a zombie), or nothing.
live_pid() {
  local pid
  pid="$(cat "$1" 2>/dev/null)" || return 0
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] || return 0
  [ "$(cut -d ' ' -f 3 "/proc/$pid/stat" 2>/dev/null)" != Z ] || return 0
  echo "$pid"
}
running_dockerd() { live_pid "$PIDFILE" dockerd; }
fail() { echo "docker-engine: $*" >&2; exit 1; }

answers && exit 0

mkdir -p "$CACHE"
# Several `make test` runs may get here at once: one of them installs and starts, the others wait.
exec 9>"$CACHE/docker-engine.lock"
flock 9
answers && exit 0

if ! command -v dockerd >/dev/null 2>&1; then
  [ "$(id -u)" = 0 ] || fail "no Docker engine, and installing one (apt-get install docker.io) needs root"
  command -v apt-get >/dev/null 2>&1 || fail "no Docker engine, and no apt-get to install docker.io with"
  echo "docker-engine: installing docker.io with apt-get" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq docker.io >"$CACHE/docker-install.log" 2>&1 \
    || { apt-get update -qq >>"$CACHE/docker-install.log" 2>&1 \
         && apt-get install -y -qq docker.io >>"$CACHE/docker-install.log" 2>&1; } \
    || fail "apt-get install docker.io failed: see $CACHE/docker-install.log"
fi

if [ -z "$(running_dockerd)" ]; then
  [ "$(id -u)" = 0 ] || fail "dockerd is installed but not running, and starting it needs root"
  echo "docker-engine: starting dockerd (log: $CACHE/dockerd.log)" >&2
  # Pid files left by an engine that was killed: while their pid lives on (as a zombie, say), dockerd
  # refuses to start, or waits for a containerd that is not there.
  rm -f "$PIDFILE"
  [ -n "$(live_pid "$CONTAINERD_PIDFILE" containerd)" ] || rm -f "$CONTAINERD_PIDFILE"
  # containerd is started by dockerd itself when none runs; setsid: the engine outlives this shell; 9>&-:
  # it must not hold the lock.
  setsid dockerd --pidfile "$PIDFILE" >>"$CACHE/dockerd.log" 2>&1 </dev/null 9>&- &
fi

for _ in $(seq "$WAIT_S"); do
  answers && exit 0
  sleep 1
  [ -n "$(running_dockerd)" ] || [ ! -e "$PIDFILE" ] || break
done
fail "dockerd did not answer within ${WAIT_S} s: $(tail -n 3 "$CACHE/dockerd.log" 2>/dev/null | tr '\n' ' ')"
