"""Metric writers: metrics.jsonl's contract (one object per row, NaN and infinities as null, the
file rewritten from the history on resume), TensorBoard event files read back record by record
(TFRecord framing and CRC-32C checked here, independently of tensorboardX), only process 0
writing files, and no TensorFlow."""

import json
import math
import os
import struct
import sys

import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from configs import base
from fedjax_med import checkpoint, writers
from fedjax_med.validate import validate
from tests.test_config_errors import smoke

NAN, INF = float('nan'), float('inf')
# Rows as train.run writes them: numbers, None, NaN and infinities, lists, strings.
ROWS = [
    {
        'round': 1,
        'train/loss': 0.75,
        'eval/mean_auroc': 0.5,
        'comm/bytes_up': 1234,
        'comm/compression_ratio': None,
        'privacy/epsilon_per_hospital': [0.5, 1.25],
        'hospital/hospital_0/mean_auroc': NAN,
        'hospital/view=PA/mean_auroc': 0.625,
    },
    {
        'round': 2,
        'train/loss': 0.5,
        'eval/auroc/Hernia': NAN,
        'eval/mean_dice': -INF,
        'privacy/epsilon_per_hospital': [INF, 2.0],
        'summary/stopped': 'privacy budget reached',
        'dp/flag': True,
        'time/round_s': 0.25,
    },
    {'round': 3, 'train/loss': 0.25},
]


def read_jsonl(workdir):
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        return f.read()


def expected_jsonl(rows):
    """metrics.jsonl as the contract has it: json.dumps of each row with NaN / +-inf as null."""
    fix = lambda v: None if isinstance(v, float) and not math.isfinite(v) else v
    return ''.join(
        json.dumps(
            {k: [fix(x) for x in v] if isinstance(v, list) else fix(v) for k, v in r.items()}
        )
        + '\n'
        for r in rows
    )


# ---------------------------------------------------------------------------------------------
# metrics.jsonl
# ---------------------------------------------------------------------------------------------


def test_json_safe_turns_non_finite_floats_into_none_also_in_lists():
    assert writers.json_safe(ROWS[0]) == {
        'round': 1,
        'train/loss': 0.75,
        'eval/mean_auroc': 0.5,
        'comm/bytes_up': 1234,
        'comm/compression_ratio': None,
        'privacy/epsilon_per_hospital': [0.5, 1.25],
        'hospital/hospital_0/mean_auroc': None,
        'hospital/view=PA/mean_auroc': 0.625,
    }
    assert writers.json_safe({'a': [NAN, 1, 'x'], 'b': -INF, 'c': 's', 'd': 3}) == {
        'a': [None, 1, 'x'],
        'b': None,
        'c': 's',
        'd': 3,
    }


def test_jsonl_is_one_object_per_row_with_nan_and_infinities_as_null(tmp_path):
    writer = writers.JsonlWriter(str(tmp_path))
    assert writer.path == str(tmp_path / 'metrics.jsonl')
    assert read_jsonl(tmp_path) == ''  # made (empty) at once
    writer.write(ROWS[0])
    writer.write_row(ROWS[1])
    writer.write_scalars(3, {'train/loss': 0.25})
    writer.close()
    text = read_jsonl(tmp_path)
    assert text == expected_jsonl(ROWS)
    assert 'NaN' not in text and 'Infinity' not in text
    assert [json.loads(line) for line in text.splitlines()] == writer.history
    assert writer.history[1]['privacy/epsilon_per_hospital'] == [None, 2.0]


def test_jsonl_is_rewritten_from_the_history_on_resume(tmp_path):
    first = writers.JsonlWriter(str(tmp_path))
    for row in ROWS:
        first.write(row)
    history = first.history[:1]  # the checkpoint was after round 1; rounds 2-3 are run again
    resumed = writers.JsonlWriter(str(tmp_path), history)
    assert read_jsonl(tmp_path) == expected_jsonl(ROWS[:1])
    resumed.write({'round': 2, 'train/loss': 0.125})
    assert read_jsonl(tmp_path) == expected_jsonl([ROWS[0], {'round': 2, 'train/loss': 0.125}])
    assert resumed.history == [writers.json_safe(ROWS[0]), {'round': 2, 'train/loss': 0.125}]
    assert history == [writers.json_safe(ROWS[0])]  # the caller's list is not changed


def test_a_jsonl_writer_that_does_not_write_keeps_the_history_only(tmp_path):
    (tmp_path / 'metrics.jsonl').write_text('left as it is\n')
    writer = writers.JsonlWriter(str(tmp_path), [{'round': 1}], write=False)
    writer.write({'round': 2, 'x': NAN})
    assert writer.history == [{'round': 1}, {'round': 2, 'x': None}]
    assert read_jsonl(tmp_path) == 'left as it is\n'


# ---------------------------------------------------------------------------------------------
# TensorBoard event files
# ---------------------------------------------------------------------------------------------


def _crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_records(path):
    """The records of a TFRecord file (uint64 length, masked CRC-32C of the length, data, masked
    CRC-32C of the data; little-endian), checking both CRCs."""
    with open(path, 'rb') as f:
        data = f.read()
    records, pos = [], 0
    while pos < len(data):
        header = data[pos : pos + 8]
        (length,) = struct.unpack('<Q', header)
        (header_crc,) = struct.unpack('<I', data[pos + 8 : pos + 12])
        body = data[pos + 12 : pos + 12 + length]
        (body_crc,) = struct.unpack('<I', data[pos + 12 + length : pos + 16 + length])
        assert header_crc == _masked(_crc32c(header)) and body_crc == _masked(_crc32c(body))
        records.append(body)
        pos += 16 + length
    assert pos == len(data)
    return records


def read_scalars(logdir):
    """{tag: [(step, value), ...]} over every event file in logdir, and the number of files."""
    files = sorted(f for f in os.listdir(logdir) if f.startswith('events.out.tfevents.'))
    scalars = {}
    for name in files:
        events = [event_pb2.Event.FromString(r) for r in read_records(os.path.join(logdir, name))]
        assert events[0].file_version == 'brain.Event:2'
        for event in events[1:]:
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars, len(files)


def test_tensorboard_holds_every_numeric_scalar_of_each_row_at_its_round(tmp_path):
    logdir = str(tmp_path / 'tb')
    with writers.TensorBoardWriter(logdir) as writer:
        writer.write_row(ROWS[0])
        writer.write_row(ROWS[1])
        writer.write_scalars(
            3,
            {
                'train/loss': 0.25,
                'dp/grad_norm_mean': np.float32(1.5),
                'clients/steps': np.int64(7),
                'x': np.float32('nan'),
                'y': np.bool_(True),
                'z': np.zeros(2),
                'w': 0.1,
            },
        )
    scalars, num_files = read_scalars(logdir)
    assert num_files == 1
    assert scalars == {
        'train/loss': [(1, 0.75), (2, 0.5), (3, 0.25)],
        'eval/mean_auroc': [(1, 0.5)],
        'comm/bytes_up': [(1, 1234.0)],
        'hospital/view=PA/mean_auroc': [(1, 0.625)],  # tags are the keys, unchanged
        'time/round_s': [(2, 0.25)],
        'dp/grad_norm_mean': [(3, 1.5)],
        'clients/steps': [(3, 7.0)],
        'w': [(3, float(np.float32(0.1)))],  # simple_value is a float32
    }, 'lists, arrays, strings, booleans, None, NaN and infinities are left out; so is the step'


def test_tensorboard_is_rewritten_from_the_history_on_resume(tmp_path):
    logdir = str(tmp_path / 'tb')
    (tmp_path / 'tb').mkdir()
    (tmp_path / 'tb' / 'notes.txt').write_text('not an event file: kept')
    first = writers.TensorBoardWriter(logdir)
    for r in range(1, 5):
        first.write_scalars(r, {'train/loss': 1.0 / r})
    first.close()
    # Killed after round 4, checkpointed after round 2: rounds 3-4 are run again.
    history = [{'round': 1, 'train/loss': 1.0}, {'round': 2, 'train/loss': 0.5}]
    resumed = writers.TensorBoardWriter(logdir, history)
    resumed.write_scalars(3, {'train/loss': 0.125})
    scalars, num_files = read_scalars(logdir)
    assert num_files == 1
    assert scalars == {'train/loss': [(1, 1.0), (2, 0.5), (3, 0.125)]}
    resumed.close()
    assert (tmp_path / 'tb' / 'notes.txt').read_text() == 'not an event file: kept'


def test_tensorboard_without_tensorflow():
    assert 'tensorflow' not in sys.modules


# ---------------------------------------------------------------------------------------------
# The writers of a run
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize('tensorboard', [True, False])
def test_the_default_writer_writes_jsonl_and_tensorboard_and_keeps_the_history(
    tmp_path, tensorboard
):
    history = [writers.json_safe(ROWS[0])]
    writer = writers.create_default_writer(
        str(tmp_path), history, primary=True, tensorboard=tensorboard
    )
    writer.write_row(ROWS[1])
    writer.close()
    assert writer.history == [writers.json_safe(r) for r in ROWS[:2]]
    assert read_jsonl(tmp_path) == expected_jsonl(ROWS[:2])
    assert os.path.isdir(tmp_path / 'tensorboard') == tensorboard
    if tensorboard:
        scalars, _ = read_scalars(str(tmp_path / 'tensorboard'))
        assert scalars['train/loss'] == [(1, 0.75), (2, 0.5)]
        assert scalars['eval/mean_auroc'] == [(1, 0.5)]
        assert 'eval/mean_dice' not in scalars  # -inf: null in metrics.jsonl


def test_only_the_primary_process_writes_files(tmp_path):
    writer = writers.create_default_writer(
        str(tmp_path), [{'round': 1}], primary=False, tensorboard=True
    )
    writer.write_scalars(2, {'train/loss': NAN})
    writer.flush()
    writer.close()
    assert writer.writers == []
    assert writer.history == [{'round': 1}, {'round': 2, 'train/loss': None}]
    assert os.listdir(tmp_path) == []


def test_a_multi_writer_sends_each_row_to_every_writer(tmp_path):
    class Recorder(writers.MetricWriter):
        def __init__(self):
            self.rows, self.calls = [], []

        def write_row(self, row):
            self.rows.append(row)

        def flush(self):
            self.calls.append('flush')

        def close(self):
            self.calls.append('close')

    a, b = Recorder(), Recorder()
    with writers.MultiWriter([a, b]) as multi:
        multi.write_scalars(1, {'x': NAN, 'y': [INF]})
        multi.flush()
    assert a.rows == b.rows == [{'round': 1, 'x': None, 'y': [None]}] == multi.history
    assert a.calls == b.calls == ['flush', 'close']


def test_the_tensorboard_field_is_a_valid_resumable_logging_setting():
    assert base.get_config().tensorboard is True
    for value in (True, False):
        validate(smoke(tensorboard=value))
    assert 'tensorboard' in checkpoint.RESUMABLE_FIELDS
    assert checkpoint.ADDED_FIELDS['tensorboard'] is False
    saved = base.get_config().to_dict()
    del saved['tensorboard']  # a checkpoint written before the field existed
    assert checkpoint.config_differences(saved, base.get_config().to_dict()) == []
