"""Runs on this machine, managed by id: ``rlbus run | list | logs | stop | delete | models``.

:mod:`.registry` is the record of every run (one JSON file each under ``$RLBUS_HOME/runs``) and
what its status is, with no processes; :mod:`.process` starts, inspects and signals them;
:mod:`.wrapper` is the detached process that runs ``rlbus rl`` and records how it ended;
:mod:`.cli` and :mod:`.models` are the commands.
"""
