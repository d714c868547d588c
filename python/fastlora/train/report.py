"""`--report-to tensorboard`: every metrics record also as TensorBoard scalars (and the
sample generations and warnings as text), in `<output-dir>/runs`. tensorboard is optional."""

from __future__ import annotations

from pathlib import Path

from .errors import TrainError

REPORT_TO = ("none", "tensorboard")
RUNS_DIR = "runs"


def check(report_to: str) -> None:
    if report_to not in REPORT_TO:
        raise TrainError(f"--report-to: expected one of {', '.join(REPORT_TO)}, got {report_to!r}")
    if report_to == "tensorboard":
        try:
            import tensorboard  # noqa: F401  (what torch.utils.tensorboard writes with)
        except ImportError:
            raise TrainError("--report-to tensorboard: the tensorboard package is not installed "
                             "(pip install tensorboard, or pip install 'fastlora[tensorboard]')") from None


class TensorBoard:
    """Writes records to event files; a resumed run first drops the events after its step."""

    def __init__(self, out: Path, resume_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out / RUNS_DIR), purge_step=resume_step or None)

    def write(self, record: dict) -> None:
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, step)
        if record.get("warning"):
            self.writer.add_text("warning", record["warning"], step)
        for i, sample in enumerate(record.get("samples", ())):
            self.writer.add_text(f"sample_{i}", f"**{sample['prompt']}** {sample['output']}", step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_reporter(report_to: str, out: Path, resume_step: int) -> TensorBoard | None:
    return TensorBoard(out, resume_step) if report_to == "tensorboard" else None
