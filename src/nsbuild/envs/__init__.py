"""Environments ("chroots"): chroot.d config, rootless creation, unpack-once
store, copy-on-write sessions, garbage collection.

API (everything raises EnvError, an NsbuildError, with a one-line message):

    load_config() -> Config                    # system + user chroot.d, user wins
    Config.get(name_or_alias) -> EnvConfig     # EnvError naming the known ones
    Config.find(name_or_alias) -> EnvConfig | None;  iter(Config) -> EnvConfig...

    with throwaway(name_or_config, extra_lowers=(dir, ...)) as session:
        ...                                    # fresh copy-on-write root, removed on
                                               # exit (also on exceptions)
    begin_session(name_or_config) -> Session   # persistent, like schroot's
    get_session(id) -> Session
    end_session(id)                            # refused while a command runs in it
    list_sessions() -> list[Session]

    Session.id, .config (EnvConfig), .upper (host path of the upper dir), .lowers,
    .root   -> RootMount for Sandbox(root=...)  (Overlay(lowers, upper, work, "/"))
    .mounts -> (Proc(), Dev(), Sys(), Tmpfs("/tmp"), config Bind-Mounts...)
    .env    -> PATH, LANG=C.UTF-8, TZ=UTC, HOME=/root, SOURCE_DATE_EPOCH if set
    .sandbox(argv, mounts=, env=, unsetenv=, clearenv=, user=, cwd=, share_net=,
             hostname=, debug=) -> Sandbox   # all of the above put together
    .in_use()                                  # context: hold while a command runs

    create_env(name, suite, architecture=, variant=, mirror=, include=, aliases=)
    update_env(name);  remove_env(name)
    gc(dry_run=False) -> GcReport
    remove_tree(path)  # delete subuid-owned trees (from a user namespace), no mounts crossed
    cache_masks(mounts) -> list[Bind]  # read-only empty folders over the cache folders
                                       # that writable binds show: mount them after those

`extra_lowers` stack read-only layers (top first) between the base and the
upper dir: the build layer's cached dependency layer goes there.
"""

from __future__ import annotations

# Not `typing` (and the re, enum... it imports): `nsbuild run` imports this
# package for masks.py on every run.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from nsbuild.envs.cleanup import GcReport, gc
    from nsbuild.envs.config import BindMount, Config, EnvConfig, load_config
    from nsbuild.envs.create import create_env, remove_env, update_env
    from nsbuild.envs.errors import ConfigError, EnvError, UnsafeTarball
    from nsbuild.envs.masks import cache_masks
    from nsbuild.envs.remove import remove_tree
    from nsbuild.envs.session import (
        Session,
        begin_session,
        end_session,
        get_session,
        list_sessions,
        throwaway,
    )

# Imported on first use: `nsbuild run --env` needs only the session module,
# not creation or gc (startup time is a feature).
_WHERE = {
    "BindMount": "config",
    "Config": "config",
    "EnvConfig": "config",
    "load_config": "config",
    "create_env": "create",
    "remove_env": "create",
    "update_env": "create",
    "ConfigError": "errors",
    "EnvError": "errors",
    "UnsafeTarball": "errors",
    "cache_masks": "masks",
    "GcReport": "cleanup",
    "gc": "cleanup",
    "remove_tree": "remove",
    "Session": "session",
    "begin_session": "session",
    "end_session": "session",
    "get_session": "session",
    "list_sessions": "session",
    "throwaway": "session",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'nsbuild.envs' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"nsbuild.envs.{_WHERE[name]}"), name)


__all__ = [
    "BindMount",
    "Config",
    "ConfigError",
    "EnvConfig",
    "EnvError",
    "GcReport",
    "Session",
    "UnsafeTarball",
    "begin_session",
    "cache_masks",
    "create_env",
    "end_session",
    "gc",
    "get_session",
    "list_sessions",
    "load_config",
    "remove_env",
    "remove_tree",
    "throwaway",
    "update_env",
]
