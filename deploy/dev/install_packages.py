#!/usr/bin/env python3
"""Installs Debian packages that the local development tooling needs (services.py and the
Makefile): directly when root, through `sudo -n` when the user has passwordless sudo, otherwise
stops with the command to run by hand.

Usage: deploy/dev/install_packages.py PACKAGE...

Standard library only: it runs before the project's virtualenv exists.
"""

import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence

# Another install (the system's, or a second checkout's) may hold dpkg's lock: wait for it
# rather than fail at once.
APT_GET = ["apt-get", "-o", "DPkg::Lock::Timeout=300"]
INSTALL = ["install", "-y", "-q", "--no-install-recommends"]


class Unavailable(Exception):
    """The packages cannot be installed from here; the message says what to do instead."""


def as_root(packages: Sequence[str]) -> list[str]:
    """The prefix that runs apt-get as root: none for root, `sudo -n` with passwordless sudo."""
    names = " ".join(packages)
    # Without apt this is not a Debian-like system: only a person can pick the packages.
    if shutil.which("apt-get") is None:
        raise Unavailable(
            f"missing packages: {names}; install them with your system's package manager"
        )
    if os.geteuid() == 0:
        return []
    # -n: never prompt, so scripts and CI fail fast instead of hanging on a password.
    if shutil.which("sudo") and _succeeds(["sudo", "-n", "true"]):
        return ["sudo", "-n"]
    raise Unavailable(
        f"missing Debian packages: {names}; install them with: "
        f"sudo apt-get install --no-install-recommends {names}"
    )


def apt_commands(prefix: Sequence[str], packages: Sequence[str]) -> list[list[str]]:
    """The apt-get runs that install `packages`, each behind `prefix`."""
    return [
        [*prefix, *APT_GET, "update", "-q"],
        [*prefix, "env", "DEBIAN_FRONTEND=noninteractive", *APT_GET, *INSTALL, *packages],
    ]


def install(packages: Sequence[str]) -> None:
    """Installs `packages` with apt-get; raises Unavailable when that cannot be done from here."""
    commands = apt_commands(as_root(packages), packages)
    print(f"install-packages: installing Debian packages: {' '.join(packages)}", file=sys.stderr)
    for command in commands:
        # apt's chatter goes to stderr: callers such as `services.py up` keep stdout clean.
        if subprocess.run(command, stdout=sys.stderr.fileno(), check=False).returncode:
            raise Unavailable(f"{shlex.join(command)} failed")


def _succeeds(command: list[str]) -> bool:
    return subprocess.run(command, capture_output=True, check=False).returncode == 0


def main(argv: Sequence[str]) -> int:
    """The command line: installs the packages named in `argv`."""
    if not argv:
        print("usage: install_packages.py PACKAGE...", file=sys.stderr)
        return 2
    try:
        install(argv)
    except Unavailable as error:
        print(f"install-packages: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
