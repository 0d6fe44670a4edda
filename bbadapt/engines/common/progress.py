"""Progress of a training run, the same for both engines: a rich bar on a terminal, plain lines otherwise,
and ``train.log.jsonl`` (one JSON record per logged iteration, validation, checkpoint and epoch)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Optional

from bbadapt.engines.common.schedule import LOSSES


@contextlib.contextmanager
def console_progress(console) -> Iterator[Callable[[dict], None]]:
    """A rich progress bar (loss components, samples/s) on a terminal; plain lines otherwise.

    Plain lines are printed for logged iterations, validations and checkpoints only, so a CI
    log gets what ``train.log.jsonl`` gets, readable.
    """
    if console.is_terminal:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        columns = (TextColumn("{task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[losses]}"), TimeRemainingColumn())
        with Progress(*columns, console=console, transient=False) as bar:
            task = bar.add_task("train", total=None, epoch="-", losses="")
            yield lambda record: _bar_update(bar, task, console, record)
    else:
        yield lambda record: _plain_line(console, record)


def _loss_text(record: dict) -> str:
    parts = " ".join(f"{k}={record[k]:.3f}" for k in LOSSES)
    return f"loss={record['loss']:.3f} ({parts}) lr={record['lr']:.2e} {record['samples_per_s']:.2f} samples/s"


def _epoch_text(record: dict) -> str:
    return f"epoch {record['epoch']}/{record['epochs']}" if record.get("epochs") else f"epoch {record['epoch']}"


def _bar_update(bar, task, console, record: dict) -> None:
    if record["event"] == "iter":
        bar.update(task, completed=record["batch"] + 1, total=record["batches"], epoch=_epoch_text(record),
                   losses=_loss_text(record))
    else:
        _plain_line(console, record)


def _plain_line(console, record: dict) -> None:
    event = record["event"]
    if event == "start":
        if record["epoch"] > record["epochs"]:
            return
        line = (f"training epochs {record['epoch']}..{record['epochs']} on {record['images']} images: "
                f"lr {record['lr']:g}, warmup {record['warmup_iters']} iterations"
                + (f" (defaults: {record['defaults']})" if record.get("defaults") else ""))
    elif event == "iter" and record.get("logged"):
        line = f"{_epoch_text(record)} batch {record['batch'] + 1}/{record['batches']}: {_loss_text(record)}"
    elif event == "epoch":
        line = (f"{_epoch_text(record)} done ({record['batches']} batches, {record['workers']} worker(s)): "
                f"{_loss_text(record)}")
    elif event == "val":
        line = f"{_epoch_text(record)} validation: {record['metric']} mAP {record['map']:.4f}"
    elif event == "checkpoint":
        line = f"checkpoint {record['path']}{' (new best)' if record['best'] else ''}"
    else:
        return
    console.print(line, markup=False, highlight=False)




class Log:
    """``train.log.jsonl`` (rank 0 only) plus the progress callback."""

    def __init__(self, path: Optional[Path], progress: Optional[Callable[[dict], None]]):
        self.path, self.progress = path, progress

    def __call__(self, record: dict, write: bool = True) -> None:
        record = {"time": datetime.now(UTC).isoformat(timespec="seconds"), **record}
        if write and self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if self.progress:
            self.progress({**record, "logged": write})
