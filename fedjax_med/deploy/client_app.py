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
         the reason and no update. With config.secagg.enabled it keeps its update, makes its
         round's key pairs and self-mask seed from the OS CSPRNG and replies their public keys
         instead of the update (`secagg.advertise`).
  query  'fields' with a secagg stage (share-keys, masked-input, unmask): the next message
         round of secure aggregation (`secagg_reply`, fedjax_med/deploy/secagg.py); its keys,
         seeds, received shares and update stay in the SuperNode's state of this run, at the
         hospital, and are deleted after unmasking.

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
    """Tells the server which hospital this node is, or answers a secure-aggregation stage."""
    if 'fields' in msg.content:
        return Message(secagg_reply(msg.content, context), reply_to=msg)
    return Message(
        RecordDict({'hospital': ConfigRecord({'hospital': hospital_index(context)})}), reply_to=msg
    )


_SECAGG = 'fedjax_med.secagg'
_SECAGG_UPDATE = 'fedjax_med.secagg.update'


def _keep_secagg(context: Context, state: dict) -> None:
    fields = {k: v for k, v in state.items() if k != 'held'}
    if 'held' in state:
        fields['held-from'] = [int(v) for v in state['held']]
        fields['held-ct'] = list(state['held'].values())
    context.state[_SECAGG] = ConfigRecord(fields)


def _load_secagg(context: Context) -> dict:
    if _SECAGG not in context.state:
        raise ValueError('this hospital holds no secure-aggregation keys for the round.')
    state = dict(context.state[_SECAGG])
    if 'held-from' in state:
        state['held'] = dict(zip(state.pop('held-from'), state.pop('held-ct'), strict=True))
    for name in ('neighbours', 'cipher-pks', 'mask-pks'):
        if name in state:
            state[name] = list(state[name])
    return state


def secagg_reply(content: RecordDict, context: Context) -> RecordDict:
    """The hospital's answer to one secure-aggregation message (`content`, built by
    `wire.to_content` with a `stage`): its state is read from and written back to
    `context.state`. A request it will not answer gets a refusal with the reason."""
    from fedjax_med.deploy import secagg, wire

    request = wire.from_content(content)
    stage = request.pop('stage', '')
    try:
        state = _load_secagg(context)
        if stage == 'share-keys':
            state, reply = secagg.share_keys(state, request)
        elif stage == 'masked-input':
            update = context.state[_SECAGG_UPDATE]['update'].numpy()
            state, reply = secagg.masked_input(state, request, update)
        elif stage == 'unmask':
            reply = secagg.unmask(state, request)
            del context.state[_SECAGG], context.state[_SECAGG_UPDATE]
            return wire.to_content(reply)
        else:
            raise secagg.ProtocolError(f'unknown secure-aggregation stage {stage!r}.')
    except (secagg.ProtocolError, ValueError) as e:
        return RecordDict({'refused': ConfigRecord({'reason': str(e)})})
    _keep_secagg(context, state)
    return wire.to_content(reply)


def keep_update_for_secagg(context: Context, k: int, round_index: int, delta) -> dict:
    """Keeps this hospital's update and its new secure-aggregation state at the hospital;
    returns the public keys to advertise."""
    from flwr.app import Array, ArrayRecord

    from fedjax_med.deploy import secagg

    state, reply = secagg.advertise(k, round_index)
    _keep_secagg(context, state)
    context.state[_SECAGG_UPDATE] = ArrayRecord({'update': Array(secagg.flatten(delta))})
    return reply


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
        {'metrics': MetricRecord(metrics), 'hospital': ConfigRecord({'hospital': k})}
    )
    if config.secagg.enabled:  # the update stays here; only its masked sum leaves
        keys = keep_update_for_secagg(context, k, round_index, out['delta'])
        content['secagg-keys'] = ConfigRecord(keys)
    else:
        content['update'] = wire.to_record(out['delta'])
    return Message(content, reply_to=msg)
