"""`fastlora plot RUN_DIR`: one PNG of a training run's `metrics.jsonl`.

Panels against the step: train loss with every eval curve (`eval_loss`, `eval_NAME_loss`;
a record at step 0 holds the base model's level, drawn as a dashed line), learning rate,
gradient norm (steps that logged a spike warning marked), tokens/s and peak memory.
matplotlib is an optional extra (`pip install 'fastlora[plot]'`).
"""

from __future__ import annotations

import os
from pathlib import Path

from .data import json_lines
from .errors import TrainError

METRICS_NAME = "metrics.jsonl"
PANELS = (("lr", "learning rate"), ("grad_norm", "gradient norm"), ("tokens_per_sec", "tokens/s"),
          ("peak_memory_mib", "peak memory (MiB)"))


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of `run_dir/metrics.jsonl`; TrainError naming the file when there are none."""
    path = Path(run_dir) / METRICS_NAME
    if not path.is_file():
        raise TrainError(f"{run_dir}: no {METRICS_NAME} (not a fastlora train output directory)")
    records = []
    for number, record in json_lines(path):
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise TrainError(f"{path}:{number}: not a metrics record (no integer 'step')")
        records.append(record)
    if not records:
        raise TrainError(f"{path}: no records")
    return records


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise TrainError("fastlora plot needs matplotlib: pip install 'fastlora[plot]'") from None
    return plt, MaxNLocator


def plot(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Writes the run's curves to `output` (default `run_dir/metrics.png`), atomically; returns it."""
    records = read_metrics(run_dir)
    plt, MaxNLocator = _pyplot()
    output = Path(output) if output is not None else Path(run_dir) / "metrics.png"
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), constrained_layout=True)
    loss_ax, panels = axes[0][0], [axes[0][1], axes[0][2], axes[1][0], axes[1][1]]
    base = [r for r in records if r["step"] == 0]
    steps = [r for r in records if r["step"] > 0]

    def curve(key: str) -> tuple[list[int], list[float]]:
        points = [(r["step"], r[key]) for r in steps if isinstance(r.get(key), (int, float))]
        return [s for s, _ in points], [v for _, v in points]

    loss_ax.plot(*curve("loss"), label="train loss")
    eval_keys = sorted({k for r in records for k in r if k == "eval_loss" or (k.startswith("eval_")
                                                                            and k.endswith("_loss"))})
    for key in eval_keys:
        line, = loss_ax.plot(*curve(key), marker="o", label=key)
        levels = [r[key] for r in base if isinstance(r.get(key), (int, float))]
        if levels:
            loss_ax.axhline(levels[0], linestyle="--", color=line.get_color(), label=f"{key} (base model)")
    loss_ax.set_title("loss")
    loss_ax.legend(fontsize="small")
    for ax, (key, title) in zip(panels, PANELS, strict=True):
        ax.plot(*curve(key))
        ax.set_title(title)
    spikes = [r["step"] for r in steps if "warning" in r]
    if spikes:
        norms = dict(zip(*curve("grad_norm"), strict=True))
        panels[1].scatter(spikes, [norms.get(s, 0.0) for s in spikes], color="red", zorder=3, label="spike warning")
        panels[1].legend(fontsize="small")
    axes[1][2].axis("off")
    for ax in (loss_ax, *panels):
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.suptitle(f"fastlora train: {Path(run_dir).resolve().name}")
    tmp = output.with_name(f".{output.name}.tmp")
    fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
    os.replace(tmp, output)
    return output
