"""A rich progress bar that the library reports into (``medpipe.ingest.ProgressSink``)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class RichProgress:
    def __init__(self, console: Console) -> None:
        self._progress = Progress(
            TextColumn("[bold]{task.description:<18}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False,
        )
        self._task: TaskID | None = None

    def __enter__(self) -> RichProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def start(self, phase: str, total: int) -> None:
        self._task = self._progress.add_task(phase, total=max(total, 0))

    def advance(self, n: int = 1) -> None:
        if self._task is not None:
            self._progress.advance(self._task, n)


def bar_factory(progress: RichProgress) -> Callable[[str, int], contextlib.AbstractContextManager[Callable[[int], None]]]:
    """``factory(description, total)``: a context manager that shows a bar and yields ``advance(n)``."""

    @contextlib.contextmanager
    def bar(description: str, total: int) -> Iterator[Callable[[int], None]]:
        task = progress._progress.add_task(description, total=max(total, 0))

        def advance(n: int = 1) -> None:
            progress._progress.advance(task, n)

        yield advance

    return bar
