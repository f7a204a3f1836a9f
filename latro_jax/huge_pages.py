"""glibc's malloc on transparent huge pages for the command-line entry points.

XLA:CPU allocates every execution's buffers with malloc and frees them when it is done; glibc
serves the large ones as fresh mmaps, whose 4 KiB pages the kernel faults in (and zeroes) one
by one. The demo took 55 M minor page faults and 102 s of system CPU time in 218 s of wall time.
The glibc (>= 2.35) tunable `glibc.malloc.hugetlb=1` has malloc ask for transparent huge pages
(madvise) on its mappings: 1.1 M faults, 44 s of system time, 184-188 s of wall time, the same
results. Tunables are read when the process starts, so an entry point calls
`reexec_with_huge_pages()` first and runs again, once, with the tunable set.

A GLIBC_TUNABLES already in the environment, even empty, is left as it is (that is the way to
opt out); so is a system without glibc >= 2.35 or with transparent huge pages off.
"""

from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the running glibc, or None where the C library is not glibc."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    except (AttributeError, ValueError, OSError):
        return None
    major, minor = version.split(".")[:2]
    return (int(major), int(minor)) if name == "glibc" else None


def transparent_huge_pages_usable() -> bool:
    """Whether the kernel gives transparent huge pages to memory that asks (mode not [never])."""
    try:
        with open(THP_MODE) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def supported() -> bool:
    """Whether this system honours the tunable: Linux, glibc >= 2.35, transparent huge pages on."""
    return (sys.platform == "linux" and (glibc_version() or (0, 0)) >= (2, 35)
            and transparent_huge_pages_usable())


def wanted() -> bool:
    """Whether this process should re-execute itself with the tunable: supported() and the user
    set no GLIBC_TUNABLES."""
    return "GLIBC_TUNABLES" not in os.environ and supported()


def reexec_with_huge_pages() -> None:
    """Replace this process by the same command line with GLIBC_TUNABLES=glibc.malloc.hugetlb=1
    (same pid, same arguments and environment otherwise); returns at once where not wanted()."""
    if not wanted():
        return
    os.environ["GLIBC_TUNABLES"] = TUNABLE
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, sys.orig_argv)
