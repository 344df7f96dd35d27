#!/usr/bin/env bash
# Installs Debian packages that the local development tooling needs (used by
# services.sh and the Makefile): directly when root, through `sudo -n` when the
# user has passwordless sudo, otherwise stops with the command to run by hand.
# Usage: deploy/dev/install-packages.sh PACKAGE...
set -euo pipefail

die() {
    printf 'install-packages: error: %s\n' "$*" >&2
    exit 1
}

(($# > 0)) || die "usage: $0 PACKAGE..."

# Without apt this is not a Debian-like system: only a person can pick the packages.
command -v apt-get >/dev/null || die "missing packages: $*; install them with your system's package manager"

if ((EUID == 0)); then
    as_root=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    # -n: never prompt, so scripts and CI fail fast instead of hanging on a password.
    as_root=(sudo -n)
else
    die "missing Debian packages: $*; install them with: sudo apt-get install --no-install-recommends $*"
fi

printf 'install-packages: installing Debian packages: %s\n' "$*" >&2
# Another install (the system's, or a second checkout's) may hold dpkg's lock: wait for it
# rather than fail at once.
lock_wait=(-o DPkg::Lock::Timeout=300)
# apt's chatter goes to stderr: callers such as `services.sh env` keep stdout for their own output.
"${as_root[@]}" apt-get "${lock_wait[@]}" update -q >&2
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get "${lock_wait[@]}" install -y -q --no-install-recommends "$@" >&2
