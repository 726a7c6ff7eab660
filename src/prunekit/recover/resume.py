"""TODO"""
from __future__ import annotations

from prunekit.config import config_from_dict
from prunekit.errors import RunError
from prunekit.io.atomic import PathLike
from prunekit.recover.loop import recover
from prunekit.run.directory import Run


def resume(run_dir: PathLike, model, teacher=None, data=None, **runtime):
    """Continue an interrupted `recover(..., checkpoint_dir=run_dir)` with the options stored in the run.

    `model` and `teacher` must be the same architectures as in the interrupted call (their weights are
    replaced from the checkpoint); `data` defaults to the dataset named in the stored config, if any.
    Returns the recovered model, bit-identical to an uninterrupted run on the same machine."""
    stored = Run(run_dir).read_config()
    if stored is None:
        raise RunError(f"{run_dir} has no config.json; it is not a run directory written by recover()")
    cfg = config_from_dict(stored["recover"])
    if data is None:
        data = stored.get("data")
        if data is None:
            raise RunError(f"{run_dir} was recorded with in-memory data; pass the same data= to resume()")
    return recover(model, teacher=teacher, data=data, config=cfg, checkpoint_dir=run_dir, **runtime)
