"""Early stopping on an eval metric, and the best adapter it keeps.

With `--early-stopping-patience N`, every eval compares the chosen metric with the best so far
(lower is better for a loss or a perplexity, higher for a classifier's accuracy or macro F1);
an improvement of more than `--early-stopping-min-delta` writes the adapter to
`<output-dir>/best/` and resets the count, anything else counts one bad eval, and N bad evals
in a row stop the run. At the end `adapter/` holds the best adapter (and the returned model its
weights) unless `--no-load-best`.
The tracker's state goes into every checkpoint with a copy of `best/`, so `--resume`
continues the same count towards the same best.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from .checkpoint import replace_dir
from .errors import TrainError

BEST_DIR = "best"
BEST_META = "best_metric.json"


_HIGHER_IS_BETTER = ("accuracy", "macro_f1")


def metric_names(eval_set_names: list[str], task: str = "causal-lm") -> list[str]:
    """The metrics early stopping can follow, given the task and the named eval sets."""
    kinds = ("loss", "accuracy", "macro_f1") if task == "seq-cls" else ("loss", "ppl")
    return [f"eval_{kind}" for kind in kinds if kind != "ppl"] + [
        f"eval_{name}_{kind}" for name in eval_set_names for kind in kinds]


def check_metric(metric: str, eval_set_names: list[str], task: str = "causal-lm") -> None:
    names = metric_names(eval_set_names, task)
    if metric not in names:
        raise TrainError(f"--early-stopping-metric: unknown metric {metric!r}; expected one of {', '.join(names)}")


@dataclass
class EarlyStopping:
    metric: str
    patience: int
    min_delta: float = 0.0
    best: float | None = None
    best_step: int | None = None
    bad_evals: int = 0

    def update(self, step: int, record: dict) -> bool:
        """Counts the eval in `record` (a step without that metric is no eval); True when it
        is the new best."""
        value = record.get(self.metric)
        if value is None:
            return False
        sign = -1.0 if self.metric.endswith(_HIGHER_IS_BETTER) else 1.0
        if math.isfinite(value) and (self.best is None or sign * value < sign * self.best - self.min_delta):
            self.best, self.best_step, self.bad_evals = float(value), step, 0
            return True
        self.bad_evals += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_evals >= self.patience

    def state(self) -> dict:
        return asdict(self)

    def restore(self, state: dict | None) -> None:
        """Continues from a checkpoint's state (one without a tracker: from scratch)."""
        if state:
            self.best, self.best_step, self.bad_evals = state["best"], state["best_step"], int(state["bad_evals"])

    def reason(self) -> str:
        return (f"{self.metric} has not improved by more than {self.min_delta:g} for {self.bad_evals} evals "
                f"(best {self.best:.4f} at step {self.best_step})")


def write_best(out: Path, write_adapter, tracker: EarlyStopping) -> Path:
    """Writes the adapter to `out/best` through a temporary directory (rank 0)."""
    final, tmp = out / BEST_DIR, out / f".{BEST_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    write_adapter(tmp)
    (tmp / BEST_META).write_text(json.dumps({"metric": tracker.metric, "score": tracker.best,
                                             "step": tracker.best_step}) + "\n")
    replace_dir(tmp, final)
    return final


def best_step_on_disk(out: Path) -> int | None:
    meta = out / BEST_DIR / BEST_META
    try:
        return int(json.loads(meta.read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
