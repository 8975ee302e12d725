"""Ray start-up: connecting a driver to an existing session, a cluster address or a new
local cluster (`cluster.py`); whether this process is a `ray job submit` entrypoint, and
what that means for relative paths (`job.py`, no ray import).

Just above config: every Ray job (prepare, train, trajectories, evaluate, report, serve)
starts here. Imports ray and config only. The start-up of a model replica inside a Ray actor
is plain torch and lives in `decode/replica.py`.
"""
