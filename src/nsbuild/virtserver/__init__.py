"""nsbuild as an autopkgtest virtualisation server: `autopkgtest-virt-nsbuild [options] ENV`.

With it, the real `autopkgtest ... -- nsbuild ENV` and sbuild's
`--chroot-mode=autopkgtest --autopkgtest-virt-server=nsbuild` run in nsbuild
environments, rootless. Modules: protocol (the conversation), server (what
each command does), copies (copydown, copyup) and inside (the server's own
commands in the testbed), testbed (a session and what its commands share),
live (the testbed's one long-lived sandbox, which every command enters),
execute (the per-command program handed out by `print-execute-command`),
aptcache and aptformats (the apt caches the testbeds share), hostfs and untar
(the host side's access to what a testbed made), internet (the tests that
declare needs-internet, told what to pass). Nothing heavy loads before the
greeting.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from nsbuild.virtserver.server import main as server_main

    return server_main(argv)
