"""The command line, the top layer (it may import every other one).

`main` parses the command line, runs `nsbuild run` and maps errors to exit
statuses; `envs` and `build` register their subcommands when they are used.
"""
