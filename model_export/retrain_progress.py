"""A progress bar over training steps and the loss of each epoch, on a rich console, as a Keras callback."""

from __future__ import annotations

from typing import Any

import keras
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn


class EpochProgress(keras.callbacks.Callback):  # type: ignore[misc]
    """One bar per epoch (steps done of the epoch's steps, the running loss), then `epoch i/E: loss L`."""

    def __init__(self, console: Console, epochs: int) -> None:
        super().__init__()
        self.console = console
        self.epochs = epochs
        self.progress: Progress | None = None
        self.task: TaskID | None = None

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("loss {task.fields[loss]}")]
        self.progress = Progress(*columns, console=self.console, transient=True)
        self.progress.start()
        steps = self.params.get("steps") if self.params else None
        self.task = self.progress.add_task(f"epoch {epoch + 1}/{self.epochs}", total=steps, loss="-")

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if self.progress is not None and self.task is not None:
            loss = f"{float((logs or {}).get('loss', float('nan'))):.4f}"
            self.progress.update(self.task, advance=1, loss=loss)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self.progress is not None:
            self.progress.stop()
        loss = float((logs or {}).get("loss", float("nan")))
        self.console.print(f"epoch {epoch + 1}/{self.epochs}: loss {loss:.4f}", highlight=False)
