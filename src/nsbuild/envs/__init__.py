"""Environments ("chroots"): chroot.d config, rootless creation, unpack-once
store, copy-on-write sessions, garbage collection.

API, by module (everything raises errors.EnvError, an NsbuildError, with a
one-line message). The package itself exports nothing: `nsbuild run` imports
it for masks.py on every run, and each caller imports only the module it needs.

config:
    load_config() -> Config                    # system + user chroot.d, user wins
    Config.get(name_or_alias) -> EnvConfig     # EnvError naming the known ones
    Config.find(name_or_alias) -> EnvConfig | None;  iter(Config) -> EnvConfig...
    Config.known() -> "a (aliases: b), c"      # for messages

session:
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

create:
    create_env(name, suite, architecture=, variant=, mirror=, include=, aliases=)
    remove_env(name, keep_tarball=, force=)     # refused while sessions use it
update:
    update_env(name) -> Updated                 # .changed False: tarball and base untouched
suites:
    base_suite(name), debian_suites()           # UNRELEASED -> unstable, X-backports -> X
    create_command(name) -> str                 # the `nsbuild env create` that provides `name`
cleanup:
    gc(dry_run=False) -> GcReport
remove:
    remove_tree(path)  # delete subuid-owned trees (from a user namespace), no mounts crossed
masks:
    cache_masks(mounts) -> list[Bind]  # read-only empty folders over the cache folders
                                       # that writable binds show: mount them after those

`extra_lowers` stack read-only layers (top first) between the base and the
upper dir: the build layer's cached dependency layer goes there.
"""
