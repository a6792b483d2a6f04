"""What travels in Flower messages: pytrees of arrays as `ArrayRecord`s, and back.

A pytree's leaves go out under their path names (`jax.tree_util.keystr`, e.g.
"['params']['Conv_0']['kernel']") as numpy arrays of their own dtype, and come back into the
structure of a pytree the receiver already has (its own model's parameters), checked name by
name and shape by shape, so a message of another model is refused instead of misread.
"""

import jax
import numpy as np
from flwr.app import Array, ArrayRecord


def to_record(tree) -> ArrayRecord:
    """The leaves of `tree` as an ArrayRecord keyed by their path names."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return ArrayRecord({jax.tree_util.keystr(path): Array(np.asarray(x)) for path, x in leaves})


def from_record(record: ArrayRecord, like):
    """The pytree of structure `like` whose leaves are `record`'s arrays of the same names.

    Raises:
      ValueError: a name missing from `record`, or an array of another shape.
    """
    paths, treedef = jax.tree_util.tree_flatten_with_path(like)
    leaves = []
    for path, x in paths:
        name = jax.tree_util.keystr(path)
        if name not in record:
            raise ValueError(f'the message has no array {name}: it is of another model.')
        value = record[name].numpy()
        if value.shape != np.shape(x):
            raise ValueError(
                f'array {name} has shape {value.shape} in the message but {np.shape(x)} here: '
                'the message is of another model.'
            )
        leaves.append(value)
    return jax.tree.unflatten(treedef, leaves)


def num_bytes(record: ArrayRecord) -> int:
    """The payload bytes of an ArrayRecord (its arrays' data)."""
    return int(sum(array.numpy().nbytes for array in record.values()))


def to_content(values: dict, **extra):
    """A protocol message's fields (ints, floats, strings, bytes, lists of them, numpy arrays)
    as a RecordDict: arrays in an ArrayRecord 'arrays', the rest in a ConfigRecord 'fields'.
    `extra` fields (e.g. stage=...) are added to the ConfigRecord."""
    from flwr.app import ConfigRecord, RecordDict

    fields, arrays = dict(extra), {}
    for name, value in values.items():
        if isinstance(value, np.ndarray):
            arrays[name] = Array(value)
        elif isinstance(value, (list, tuple)):
            fields[name] = [v if isinstance(v, (bytes, str, float)) else int(v) for v in value]
        else:
            fields[name] = value
    return RecordDict({'fields': ConfigRecord(fields), 'arrays': ArrayRecord(arrays)})


def from_content(content) -> dict:
    """`to_content`'s fields back as a dict (arrays as numpy arrays)."""
    out = dict(content['fields']) if 'fields' in content else {}
    if 'arrays' in content:
        out.update({name: array.numpy() for name, array in content['arrays'].items()})
    return out
