"""How much work each demo stage does (`Settings`) and its progress lines (`Progress`)."""
from __future__ import annotations

import dataclasses
import sys
import time
from typing import Optional, Sequence


@dataclasses.dataclass
class Settings:
    """How much work each stage does. `quick()` keeps the code path and shrinks the amounts (for tests)."""
    macs_candidates: Sequence[float] = (0.25, 0.3, 0.35, 0.4, 0.45, 0.5)
    speedup_goal: float = 1.6
    latency_warmup: int = 2
    latency_reps: int = 15
    distill_sentences: Optional[int] = None      # None: all ~2600 lee_background sentences
    distill_batch: int = 32
    distill_epochs: int = 2
    distill_max_steps: Optional[int] = None
    distill_lr: float = 2e-4
    n_boot: int = 1000
    seed: int = 0

    @classmethod
    def quick(cls) -> "Settings":
        return cls(macs_candidates=(0.3, 0.45), latency_warmup=1, latency_reps=5, distill_sentences=192,
                   distill_batch=16, distill_epochs=1, distill_max_steps=6, n_boot=200)


class Progress:
    """Timestamped progress lines on stderr (stdout keeps the summary table and report path)."""

    def __init__(self, quiet: bool = False):
        self.t0, self.quiet = time.perf_counter(), quiet

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"[{time.perf_counter() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

