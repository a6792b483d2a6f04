"""Metric writers: where each round's row of metrics goes (in the style of `clu.metric_writers`).

A row is a flat dict, one per round: the step under 'round', then metrics such as 'train/loss',
'eval/mean_auroc', 'hospital/<name>/mean_auroc', 'comm/bytes_up', lists such as
'privacy/epsilon_per_hospital', and None for a value that does not exist in that round.

  MetricWriter        the interface: write_row(row), write_scalars(step, scalars), flush(), close()
  JsonlWriter         WORKDIR/metrics.jsonl: one JSON object per row, NaN and infinities as null
  TensorBoardWriter   WORKDIR/tensorboard/: TensorBoard event files of the numeric scalars, written
                      with tensorboardX (no TensorFlow)
  MultiWriter         several writers as one; keeps the rows written so far (`history`)
  create_default_writer(workdir, history, *, primary, tensorboard): the writers of a run

Resume: a run resumed from a checkpoint passes the checkpoint's rows as `history`. JsonlWriter
and TensorBoardWriter then rewrite their files from it, so rows that a killed run wrote after its
last checkpoint disappear and are written again when those rounds are run again. The files then
hold what an uninterrupted run writes (TensorBoard's wall times aside).

Only the first process of a multi-process run writes files (`primary`, like clu's
`create_default_writer(just_logging=jax.process_index() > 0)`); every process keeps `history`,
which the checkpoint stores. This module imports no fedjax_med module, and it imports
tensorboardX only when a TensorBoardWriter is made.
"""

from __future__ import annotations

import abc
import json
import math
import numbers
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

STEP_KEY = 'round'  # the key of a row's step
METRICS_FILE = 'metrics.jsonl'
TENSORBOARD_DIR = 'tensorboard'
_EVENT_FILE_PREFIX = 'events.out.tfevents.'  # TensorBoard reads the files named so


def json_safe(row: dict) -> dict:
    """`row` with NaN and infinite floats (e.g. AUROC of a label absent from a split), which are
    not JSON, as None (null), also inside lists."""
    fix = lambda v: None if isinstance(v, float) and not math.isfinite(v) else v
    return {k: [fix(x) for x in v] if isinstance(v, list) else fix(v) for k, v in row.items()}


class MetricWriter(abc.ABC):
    """Where rows go. `write_row` is the one method to implement; writers are context managers."""

    @abc.abstractmethod
    def write_row(self, row: Mapping[str, Any]) -> None:
        """Writes one round's row (its step under `STEP_KEY`)."""

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """clu's call: the row {'round': step, **scalars}."""
        self.write_row({STEP_KEY: step, **scalars})

    def flush(self) -> None:  # noqa: B027 (writers that write each row at once need none)
        """Makes everything written so far readable from the files."""

    def close(self) -> None:
        """Flushes and releases the files; nothing may be written afterwards."""
        self.flush()

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class JsonlWriter(MetricWriter):
    """metrics.jsonl: one JSON object per round; rewritten from the checkpoint on resume.

    The file is rewritten from `history` when the writer is made, and each row is appended (and
    flushed) as it is written, with NaN and infinite floats as null (`json_safe`). `history` holds
    the rows so far, as written. With `write=False` (every process but the first of a
    multi-process run) no file is touched and `history` is still kept.
    """

    def __init__(self, workdir: str, history: Sequence[dict] = (), *, write: bool = True):
        self.path = os.path.join(workdir, METRICS_FILE)
        self.history = list(history)
        self.enabled = write
        if self.enabled:
            with open(self.path, 'w') as f:
                f.writelines(json.dumps(h) + '\n' for h in self.history)

    def write_row(self, row: Mapping[str, Any]) -> None:
        row = json_safe(dict(row))
        self.history.append(row)
        if not self.enabled:
            return
        with open(self.path, 'a') as f:
            f.write(json.dumps(row) + '\n')
            f.flush()

    write = write_row  # the name of train.MetricsWriter's method


def _scalar(value: Any) -> float | None:
    """A finite real number as a float; None for anything else (None, NaN, infinities, strings,
    lists, booleans). numpy's integer and floating scalars are real numbers."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class TensorBoardWriter(MetricWriter):
    """TensorBoard event files in `logdir` (a folder this writer owns), written with tensorboardX.

    Each row becomes one event at step `row['round']` whose summary holds the row's numeric
    scalars as float32 `simple_value`s, tagged by their keys as metrics.jsonl has them
    ('train/loss', 'eval/mean_auroc', ...; TensorBoard groups tags by their first part). Lists,
    strings, booleans, None and values that are not finite are left out: what metrics.jsonl has
    as a number, TensorBoard has. Writes are synchronous (tensorboardX's `EventsWriter`, not the
    queue and thread of its `SummaryWriter`): after `write_row` or `flush` the event is in the file.

    Made with a resume's `history`, it deletes the event files already in `logdir` and writes the
    history again into a new one, as metrics.jsonl is rewritten: rounds that a killed run logged
    after its last checkpoint would otherwise appear twice. The history's rows carry the wall
    time of the resume.
    """

    def __init__(self, logdir: str, history: Sequence[dict] = ()):
        # tensorboardX needs only protobuf; imported only by runs that write TensorBoard.
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto import event_pb2, summary_pb2

        self._event, self._summary = event_pb2.Event, summary_pb2.Summary
        self.logdir = logdir
        os.makedirs(logdir, exist_ok=True)
        for name in os.listdir(logdir):
            if name.startswith(_EVENT_FILE_PREFIX):
                os.remove(os.path.join(logdir, name))
        # Names the file events.out.tfevents.<time>.<host>; its first event is the file version.
        self._writer = EventsWriter(os.path.join(logdir, 'events'))
        for row in history:
            self._add(row)
        self.flush()

    def _add(self, row: Mapping[str, Any]) -> None:
        values = [
            self._summary.Value(tag=key, simple_value=value)
            for key, value in ((k, _scalar(v)) for k, v in row.items() if k != STEP_KEY)
            if value is not None
        ]
        if values:
            self._writer.write_event(
                self._event(
                    wall_time=time.time(),
                    step=int(row[STEP_KEY]),
                    summary=self._summary(value=values),
                )
            )

    def write_row(self, row: Mapping[str, Any]) -> None:
        self._add(row)
        self.flush()

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class MultiWriter(MetricWriter):
    """Writes each row to every one of `writers` (none on the processes that write no files),
    and keeps the rows written so far, after `history`, in `history` (NaN and infinities as None:
    what the checkpoint stores and a resume passes back)."""

    def __init__(self, writers: Sequence[MetricWriter], history: Sequence[dict] = ()):
        self.writers = list(writers)
        self.history = list(history)

    def write_row(self, row: Mapping[str, Any]) -> None:
        row = json_safe(dict(row))
        self.history.append(row)
        for writer in self.writers:
            writer.write_row(row)

    def flush(self) -> None:
        for writer in self.writers:
            writer.flush()

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


def create_default_writer(
    workdir: str, history: Sequence[dict] = (), *, primary: bool, tensorboard: bool
) -> MultiWriter:
    """The writers of a run in `workdir`, resumed after the rows `history` (empty for a new run):
    metrics.jsonl, plus TensorBoard event files in workdir/tensorboard/ when `tensorboard`.
    Only the `primary` process (jax.process_index() == 0) writes files: elsewhere the result
    writes nothing and keeps `history`."""
    writers: list[MetricWriter] = []
    if primary:
        writers.append(JsonlWriter(workdir, history))
        if tensorboard:
            writers.append(TensorBoardWriter(os.path.join(workdir, TENSORBOARD_DIR), history))
    return MultiWriter(writers, history)
