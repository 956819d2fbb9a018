"""The build farm: nsbuild's builds run by Buildbot on many workers.

Buildbot schedules, queues and talks to the workers; nsbuild seals each build.
The farm sits beside the command line at the top of the layers and runs
`nsbuild build` as a command on the workers, so a worker's builds are what a
user's own builds are.

    buildbot.py  what a master.cfg imports: the factory, builders, scheduler
    steps.py     the Buildbot steps (fetch the source, build, upload)
    outcome.py   a build's JSON summary read, and what Buildbot is told of it
    settings.py  a master's settings and its registry of workers (files)
    daemons.py   Buildbot's tools run, and a folder's twistd known and stopped
    listeners.py who holds a TCP port here (/proc/net/tcp): ours or not
    master.py    `nsbuild farm master`: a master made and run
    worker.py    `nsbuild farm worker`: a worker made, registered and run
    rest.py      the master's REST interface, as a client
    submit.py    `nsbuild farm submit` and `status`

    pbguard.py   in a worker's twistd: connect only to a port the master's user holds

Everything but buildbot.py, steps.py and pbguard.py runs without Buildbot
(or Twisted) imported.
"""
