"""The hospital as a Flower ClientApp: what runs at hospital k, on its own SuperNode.

A SuperNode is started at each hospital with its own settings (`--node-config`):
  hospital=K       its id in the federation (required; its random streams are drawn by it);
  data-dir=DIR     its own built dataset (optional; otherwise hospital K of the config's
                   federation, e.g. of the synthetic twin);
  max-epsilon=E    its own privacy budget (optional; 0 or absent: the run's dp.target_epsilon);
  state-dir=DIR    where it keeps its accountant between rounds (optional; absent: in the
                   SuperNode's memory, lost when the SuperNode stops).

Messages it answers (sent by fedjax_med/deploy/server_app.py):
  query  'hello': replies its hospital id; imports no JAX.
  train  the global parameters and the round index: runs its local update
         (`hospital.Hospital.update`, the simulation's jitted update over a client axis of one)
         and replies its update, its number of training examples, its training loss and its own
         epsilon, nothing else; or, if the round would take it past its budget, a refusal with
         the reason and no update.

Flower starts a new ClientApp process for every message, so each train message builds the
hospital again (its data and the jitted update; JAX's persistent compilation cache makes the
compilation a read) and reads its accountant's state from its state folder first.
"""

import json
import os

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()

_PRIVACY = 'fedjax_med.privacy'


def hospital_index(context: Context) -> int:
    """This SuperNode's hospital id (its `--node-config hospital=K`)."""
    if 'hospital' not in context.node_config:
        raise ValueError(
            'this SuperNode has no hospital id; start it with --node-config "hospital=K".'
        )
    return int(context.node_config['hospital'])


@app.query()
def hello(msg: Message, context: Context) -> Message:
    """Tells the server which hospital this node is."""
    return Message(
        RecordDict({'hospital': ConfigRecord({'hospital': hospital_index(context)})}), reply_to=msg
    )


def _load_privacy(context: Context, path: str) -> dict | None:
    if path:
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)
        return None
    if _PRIVACY in context.state:
        return json.loads(context.state[_PRIVACY]['json'])
    return None


def _keep_privacy(context: Context, path: str, state: dict) -> None:
    if path:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + '.tmp', 'w') as f:
            json.dump(state, f)
        os.replace(path + '.tmp', path)
    else:
        context.state[_PRIVACY] = ConfigRecord({'json': json.dumps(state)})


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Runs one round of local training from the global parameters in `msg`."""
    from fedjax_med import parallel
    from fedjax_med.deploy import common, hospital, wire

    parallel.enable_compilation_cache()
    k = hospital_index(context)
    node = context.node_config
    run = context.run_config
    state_dir = str(node.get('state-dir', ''))
    path = os.path.join(state_dir, f'hospital_{k}_privacy.json') if state_dir else ''
    config = common.load_config(str(run['config']), str(run.get('overrides', '')))
    site = hospital.Hospital(
        config,
        k,
        data_dir=str(node.get('data-dir', '')) or None,
        max_epsilon=float(node.get('max-epsilon', 0.0)),
        privacy_state=_load_privacy(context, path),
    )
    round_index = int(msg.content['round']['round'])
    params = wire.from_record(msg.content['params'], site.exp.params)
    try:
        out = site.update(params, round_index)
    except hospital.Refused as e:
        return Message(RecordDict({'refused': ConfigRecord({'reason': str(e)})}), reply_to=msg)
    _keep_privacy(context, path, site.privacy_state())
    metrics = {
        'num-examples': out['num_examples'],
        'loss-sum': out['loss_sum'],
        'example-count': out['example_count'],
    }
    if out['epsilon'] is not None:
        metrics['epsilon'] = float(out['epsilon'])
    content = RecordDict(
        {
            'update': wire.to_record(out['delta']),
            'metrics': MetricRecord(metrics),
            'hospital': ConfigRecord({'hospital': k}),
        }
    )
    return Message(content, reply_to=msg)
