"""The server as a Flower ServerApp: the global model, the round plan and the aggregation.

`flwr run` ships this app (fedjax_med/deploy/flower_app/) to the SuperLink, which runs `main` in
its own process. Its run config (`--run-config`, a TOML file written by
`python -m fedjax_med.deploy`):
  config            FILE[:VARIANT], the run's config (the hospitals load the same);
  overrides         space-separated field=value overrides of it;
  workdir           where metrics.jsonl, summary.json, config.json and checkpoints/ go;
  connect-timeout   seconds to wait for every hospital's SuperNode (default 600);
  round-timeout     seconds to wait for a round's replies (default 600).

The run: wait until config.data.num_clients SuperNodes are connected, ask each which hospital
it is (a 'query' message), resume from the workdir's latest checkpoint if there is one, then for
each round send the round's hospitals (`server.Server.participants`) the global parameters in a
'train' message, and combine the updates that come back (`Server.finish_round`: the run's
aggregation and server optimiser step, evaluation, metrics.jsonl, checkpoint). A hospital that
refuses a round (its own privacy budget) or fails is logged, with its reason, and the round goes
on without it; a round without any update fails the run.

With config.secagg.enabled the 'train' replies carry public keys instead of updates, and the
round goes on with three more message rounds ('query' messages with a secagg stage: share-keys,
masked-input, unmask; `secure_round`, the protocol of fedjax_med/deploy/secagg.py) in which the
server relays keys and encrypted shares, sums the masked updates and removes the masks; a round
that cannot be unmasked (fewer than the threshold answered) fails the run with one line.
"""

import time

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


def _fail(line: str) -> None:
    print(f'fedjax_med.deploy: error: {line}', flush=True)
    raise SystemExit(2)


def connect_hospitals(grid: Grid, num_hospitals: int, timeout: float) -> dict[int, int]:
    """{hospital id: node id} of the connected SuperNodes, once all `num_hospitals` are there.

    Raises SystemExit(2) with one line if they are not all there within `timeout` seconds, or if
    two nodes claim the same hospital.
    """
    deadline = time.time() + timeout
    while len(list(grid.get_node_ids())) < num_hospitals:
        if time.time() > deadline:
            _fail(
                f'only {len(list(grid.get_node_ids()))} of {num_hospitals} hospitals connected '
                f'within {timeout:g} s; start a SuperNode for each hospital '
                '(python -m fedjax_med.deploy hospital --hospital=K ...).'
            )
        time.sleep(0.5)
    nodes = list(grid.get_node_ids())
    hello = [
        Message(RecordDict({'hello': ConfigRecord({})}), dst_node_id=n, message_type='query')
        for n in nodes
    ]
    found: dict[int, int] = {}
    for reply in grid.send_and_receive(hello, timeout=timeout):
        if reply.has_error():
            _fail(
                f'node {reply.metadata.src_node_id} failed to say which hospital it is: '
                f'{reply.error.reason}'
            )
        k = int(reply.content['hospital']['hospital'])
        if k in found:
            _fail(f'two SuperNodes say they are hospital {k}; give each its own --hospital.')
        found[k] = reply.metadata.src_node_id
    missing = sorted(set(range(num_hospitals)) - set(found))
    if missing:
        _fail(f'no SuperNode is hospital(s) {missing}; the connected ones are {sorted(found)}.')
    return found


def train_round(grid: Grid, site, nodes: dict[int, int], r: int, params, chosen, timeout: float):
    """Sends round r's 'train' messages to the `chosen` hospitals and collects their replies:
    ({hospital: its update and numbers}, bytes received). Refusals, failures and silence are
    noted in the server's log."""
    from fedjax_med.deploy import wire

    messages = [
        Message(
            RecordDict({'params': params, 'round': ConfigRecord({'round': r})}),
            dst_node_id=nodes[k],
            message_type='train',
            group_id=str(r + 1),
        )
        for k in chosen
    ]
    replies, up, heard = {}, 0, set()
    hospital_of = {n: k for k, n in nodes.items()}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        k = hospital_of.get(reply.metadata.src_node_id)
        heard.add(k)
        if reply.has_error():
            site.note(f'round {r + 1}: hospital {k} failed: {reply.error.reason}')
        elif 'refused' in reply.content:
            site.note(f'round {r + 1}: {reply.content["refused"]["reason"]}')
        else:
            m = reply.content['metrics']
            secure = 'secagg-keys' in reply.content
            replies[k] = {
                'delta': None
                if secure
                else wire.from_record(reply.content['update'], site.global_params()),
                'keys': dict(reply.content['secagg-keys']) if secure else None,
                'num_examples': int(m['num-examples']),
                'loss_sum': float(m['loss-sum']),
                'example_count': float(m['example-count']),
                'epsilon': float(m['epsilon']) if 'epsilon' in m else None,
            }
            up += 0 if secure else wire.num_bytes(reply.content['update'])
    for k in sorted(set(chosen) - heard):
        site.note(f'round {r + 1}: hospital {k} sent no reply within {timeout:g} s')
    return replies, up


def secure_round(grid: Grid, site, nodes: dict[int, int], r: int, replies, timeout: float):
    """Rounds 1-3 of secure aggregation among the hospitals that trained (`replies`, with their
    public keys): (the survivors' weighted mean update, the survivors, protocol bytes received).

    Raises:
      secagg.RoundFailedError: the round cannot be unmasked (one line).
    """
    from fedjax_med.deploy import secagg, wire

    sa = site.config.secagg
    server_round = secagg.ServerRound(
        r,
        {k: rep['keys'] for k, rep in replies.items()},
        site.secure_weights(replies),
        site.global_params(),
        num_hospitals=site.num_hospitals,
        clip=float(sa.clip),
        threshold=int(sa.threshold),
        neighbours=int(sa.neighbours),
        graph_seed=[int(site.config.seed), r],
    )
    hospital_of = {n: k for k, n in nodes.items()}

    def send(stage: str, requests: dict) -> dict:
        messages = [
            Message(
                wire.to_content(request, stage=stage),
                dst_node_id=nodes[k],
                message_type='query',
                group_id=f'{r + 1}/{stage}',
            )
            for k, request in requests.items()
        ]
        out = {}
        for reply in grid.send_and_receive(messages, timeout=timeout):
            k = hospital_of.get(reply.metadata.src_node_id)
            if reply.has_error():
                site.note(f'round {r + 1} ({stage}): hospital {k} failed: {reply.error.reason}')
            elif 'refused' in reply.content:
                site.note(f'round {r + 1} ({stage}): {reply.content["refused"]["reason"]}')
            else:
                out[k] = wire.from_content(reply.content)
        for k in sorted(set(requests) - set(out)):
            site.note(f'round {r + 1} ({stage}): no answer from hospital {k}')
        return out

    mean_delta, survivors = secagg.aggregate(send, server_round)
    return mean_delta, survivors, server_round.bytes_up


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Runs the deployment's rounds (see the module docstring)."""
    from fedjax_med import parallel
    from fedjax_med.deploy import common, server, wire

    parallel.enable_compilation_cache()
    run = context.run_config
    try:
        config = common.load_config(str(run['config']), str(run.get('overrides', '')))
        site = server.Server(config, str(run['workdir']))
    except (common.DeployError, ValueError) as e:
        _fail(str(e).splitlines()[0])
    nodes = connect_hospitals(grid, site.num_hospitals, float(run.get('connect-timeout', 600)))
    round_timeout = float(run.get('round-timeout', 600))
    if site.start:
        site.note(f'resumed from the checkpoint of round {site.start}')
    for r in range(site.start, config.num_rounds):
        started = time.time()
        params = wire.to_record(site.global_params())
        chosen = site.participants(r)
        replies, up = train_round(grid, site, nodes, r, params, chosen, round_timeout)
        if not replies:
            site.close()
            _fail(f'round {r + 1}: no hospital sent an update (see the lines above); stopping.')
        mean_delta = None
        if site.secagg:
            from fedjax_med.deploy import secagg

            try:
                mean_delta, survivors, up = secure_round(
                    grid, site, nodes, r, replies, round_timeout
                )
            except secagg.RoundFailedError as e:
                site.close()
                _fail(f'secure aggregation failed: {e}')
            replies = {k: replies[k] for k in survivors}
        row = site.finish_round(
            r,
            replies,
            mean_delta=mean_delta,
            bytes_up=up,
            bytes_down=wire.num_bytes(params) * len(chosen),
            started=started,
        )
        print(
            f'fedjax_med.deploy: round {r + 1}/{config.num_rounds} | '
            f'{len(replies)} of {len(chosen)} hospitals | loss {row["train/loss"]:.4f}',
            flush=True,
        )
    site.close()
