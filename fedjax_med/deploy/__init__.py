"""The deployment: the same hospital and server code across real processes and a real network,
on Flower (flwr; pip install -e '.[deploy]'). docs/DEPLOYMENT.md says what runs where.

  common.py      the run's config, loaded alike on both sides; what a deployment cannot run
  hospital.py    one hospital: its own data, the simulation's jitted local update over a client
                 axis of one, its own privacy accountant and budget (no Flower)
  server.py      the server: global state, participants, aggregation and server step,
                 evaluation, metrics.jsonl, Orbax checkpoints and resume (no Flower)
  wire.py        pytrees <-> Flower ArrayRecords
  client_app.py  the hospital as a Flower ClientApp (one per SuperNode)
  server_app.py  the server as a Flower ServerApp (run by the SuperLink)
  local.py       starting SuperLink, SuperNodes and `flwr run` (one machine: LocalDeployment)
  flower_app/    the Flower App's pyproject.toml that `flwr run` ships

Only the `*_app.py`, `wire.py` and `local.py` modules import Flower; `hospital` and `server` run
without it (and are what the tests compare against `train.run`).
"""
