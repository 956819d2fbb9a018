"""A small C source package written for the architecture tests: a shared
library (libgreeter1, Multi-Arch: same), its -dev package (Multi-Arch: same)
and a program linking both it and zlib (a Multi-Arch: same build dependency),
so a cross build exercises host-architecture libraries, dh_makeshlibs and
dpkg-shlibdeps. Its test suite runs the program (skipped by `nocheck`)."""

from __future__ import annotations

import textwrap
from pathlib import Path

_CONTROL = """\
Source: greeter
Section: misc
Priority: optional
Maintainer: nsbuild tests <tests@nsbuild.invalid>
Build-Depends: debhelper-compat (= 13), zlib1g-dev{extra}
Standards-Version: 4.6.2
Rules-Requires-Root: no

Package: libgreeter1
Section: libs
Architecture: any
Multi-Arch: same
Depends: ${{shlibs:Depends}}, ${{misc:Depends}}
Description: nsbuild test library
 Written for nsbuild's architecture tests.

Package: libgreeter-dev
Section: libdevel
Architecture: any
Multi-Arch: same
Depends: libgreeter1 (= ${{binary:Version}}), ${{misc:Depends}}
Description: nsbuild test library (development files)
 Written for nsbuild's architecture tests.

Package: greeter
Architecture: any
Depends: ${{shlibs:Depends}}, ${{misc:Depends}}
Description: nsbuild test program
 Written for nsbuild's architecture tests.
"""

_MAKEFILE = """\
LIBDIR ?= /usr/lib
all: greeter
libgreeter.so.1: greet.c greet.h
\t$(CC) $(CPPFLAGS) $(CFLAGS) -fPIC -shared -Wl,-soname,libgreeter.so.1 $(LDFLAGS) -o $@ greet.c
libgreeter.so: libgreeter.so.1
\tln -sf libgreeter.so.1 $@
greeter: main.c greet.h libgreeter.so
\t$(CC) $(CPPFLAGS) $(CFLAGS) $(LDFLAGS) -o $@ main.c -L. -lgreeter -lz
check: greeter
\tLD_LIBRARY_PATH=. ./greeter | grep -q '^hello from greeter'
install: greeter
\tinstall -d $(DESTDIR)$(LIBDIR) $(DESTDIR)/usr/include $(DESTDIR)/usr/bin
\tinstall -m 644 libgreeter.so.1 $(DESTDIR)$(LIBDIR)/
\tln -sf libgreeter.so.1 $(DESTDIR)$(LIBDIR)/libgreeter.so
\tinstall -m 644 greet.h $(DESTDIR)/usr/include/
\tinstall -m 755 greeter $(DESTDIR)/usr/bin/
clean:
\trm -f greeter libgreeter.so libgreeter.so.1
.PHONY: all check install clean
"""

_RULES = """\
#!/usr/bin/make -f
include /usr/share/dpkg/architecture.mk
%:
\tdh $@

override_dh_auto_install:
\t$(MAKE) install DESTDIR=$(CURDIR)/debian/tmp LIBDIR=/usr/lib/$(DEB_HOST_MULTIARCH)
"""

_FILES = {
    "greet.h": "const char *greeting(void);\n",
    "greet.c": '#include "greet.h"\nconst char *greeting(void) { return "hello from greeter"; }\n',
    "main.c": textwrap.dedent("""\
        #include <stdio.h>
        #include <zlib.h>
        #include "greet.h"
        int main(void) { printf("%s (zlib %s)\\n", greeting(), zlibVersion()); return 0; }
        """),
    "Makefile": _MAKEFILE,
    "debian/rules": _RULES,
    "debian/changelog": (
        "greeter (1.0) bookworm; urgency=medium\n\n  * Test package.\n\n"
        " -- nsbuild tests <tests@nsbuild.invalid>  Mon, 01 Jan 2024 00:00:00 +0000\n"
    ),
    "debian/source/format": "3.0 (native)\n",
    "debian/copyright": "Written for nsbuild's tests.\n",
    "debian/libgreeter1.install": "usr/lib/${DEB_HOST_MULTIARCH}/libgreeter.so.1\n",
    "debian/libgreeter-dev.install": (
        "usr/lib/${DEB_HOST_MULTIARCH}/libgreeter.so\nusr/include/greet.h\n"
    ),
    "debian/greeter.install": "usr/bin/greeter\n",
}

PACKAGES = ("libgreeter1", "libgreeter-dev", "greeter")


def c_package(parent: Path, build_depends: str = "") -> Path:
    """The tree greeter-1.0 under `parent`; `build_depends` is appended to
    its Build-Depends (e.g. a package with no candidate for some architecture)."""
    tree = parent / "greeter-1.0"
    for name, text in _FILES.items():
        path = tree / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (tree / "debian" / "control").write_text(
        _CONTROL.format(extra=f", {build_depends}" if build_depends else "")
    )
    (tree / "debian" / "rules").chmod(0o755)
    return tree
