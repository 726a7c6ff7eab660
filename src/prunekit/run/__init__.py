"""Runs: run directories with atomic checkpoints (directory), schedules of prune/recover steps (schedule), YAML recipes (pipeline).

Import the submodules; this package re-exports nothing so that `recover` can use `run.directory` below `run.schedule`.
"""


__all__ = []
