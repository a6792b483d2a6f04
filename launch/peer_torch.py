"""The PyTorch side of launch/peer_benchmark.py: the twin of fedjax_med's GroupNorm ResNet, a
plain FedAvg loop, Opacus DP-SGD hospitals and the Flower apps (ServerApp, ClientApp).

Imported only by peer_benchmark.py's main, after it has checked that torch, opacus and flwr are
installed (`pip install -e '.[peers]'`); nothing in fedjax_med or the tests imports it without
torch. Flower's simulation runs its ClientApps in Ray worker processes, which import this module
by name (Flower passes the driver's sys.path to them), so it holds no JAX code: the workers never
import JAX, only numpy, torch, opacus, flwr and fedjax_med's numpy-only helpers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedjax_med.data import batching, storage

# ---------------------------------------------------------------------------------------------
# The twin of fedjax_med/models/resnet.py (flax names, shapes and padding)
# ---------------------------------------------------------------------------------------------


def _same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """Low and high padding of flax/XLA 'SAME' along one axis (the extra pixel goes high)."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv(nn.Conv2d):
    """`nn.Conv2d` without bias, padded like flax's `padding='SAME'`. With stride 1 (odd kernel)
    that is the symmetric padding k // 2; with stride 2 on an even size flax pads one pixel at
    the bottom/right only, so the input is padded explicitly (the layer itself pads nothing,
    which Opacus's per-example gradients of Conv2d read from `self.padding`)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1):
        pad = kernel // 2 if stride == 1 else 0
        super().__init__(cin, cout, kernel, stride, padding=pad, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride[0] != 1:
            k, s = self.kernel_size[0], self.stride[0]
            top, bottom = _same_pads(x.shape[-2], k, s)
            left, right = _same_pads(x.shape[-1], k, s)
            if top or bottom or left or right:
                x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


def _norm(channels: int, max_groups: int) -> nn.GroupNorm:
    """fedjax_med's `group_norm`: the largest group count <= max_groups dividing `channels`,
    epsilon 1e-6, a scale and a bias per channel."""
    return nn.GroupNorm(math.gcd(channels, max_groups), channels, eps=1e-6)


class _Act(nn.Module):
    def __init__(self, negative_slope: float):
        super().__init__()
        self.negative_slope = negative_slope

    def forward(self, x):
        if self.negative_slope == 0:
            return F.relu(x)
        return F.leaky_relu(x, self.negative_slope)


class BasicBlock(nn.Module):
    """fedjax_med.models.resnet.BasicBlock, attribute names = the flax module names."""

    def __init__(self, cin, features, strides, norm_groups, negative_slope):
        super().__init__()
        self.conv1 = SameConv(cin, features, 3, strides)
        self.GroupNorm_0 = _norm(features, norm_groups)
        self.conv2 = SameConv(features, features, 3, 1)
        self.GroupNorm_2 = _norm(features, norm_groups)
        nn.init.zeros_(self.GroupNorm_2.weight)  # the block starts as the identity, as in flax
        self.has_proj = cin != features or strides != 1
        if self.has_proj:
            self.proj = SameConv(cin, features, 1, strides)
            self.GroupNorm_3 = _norm(features, norm_groups)
        self.act = _Act(negative_slope)

    def forward(self, x):
        y = self.act(self.GroupNorm_0(self.conv1(x)))
        y = self.GroupNorm_2(self.conv2(y))
        if self.has_proj:
            x = self.GroupNorm_3(self.proj(x))
        return self.act(x + y)


class TwinResNet(nn.Module):
    """fedjax_med.models.resnet.ResNet in PyTorch (NCHW), layer for layer: same parameters
    (names mapped by `flax_to_state_dict`), same padding, same GroupNorm, same head."""

    def __init__(
        self,
        stage_sizes: Sequence[int],
        width: int,
        num_outputs: int,
        norm_groups: int,
        stem_stride: int,
        in_channels: int,
        negative_slope: float = 0.0,
    ):
        super().__init__()
        self.stem_stride = stem_stride
        self.stem = SameConv(in_channels, width, 7 if stem_stride > 1 else 3, stem_stride)
        self.GroupNorm_0 = _norm(width, norm_groups)
        self.act = _Act(negative_slope)
        blocks, cin = [], width
        for i, n in enumerate(stage_sizes):
            for j in range(n):
                features = width * 2**i
                strides = 2 if i > 0 and j == 0 else 1
                blocks.append(BasicBlock(cin, features, strides, norm_groups, negative_slope))
                cin = features
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(cin, num_outputs)

    def forward(self, x):
        x = self.act(self.GroupNorm_0(self.stem(x)))
        if self.stem_stride > 1:  # flax max_pool 3x3 / 2, 'SAME' (pads with -inf)
            top, bottom = _same_pads(x.shape[-2], 3, 2)
            left, right = _same_pads(x.shape[-1], 3, 2)
            x = F.max_pool2d(F.pad(x, (left, right, top, bottom), value=-math.inf), 3, 2)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(dim=(-2, -1)))


def build_twin(arch: dict) -> TwinResNet:
    """`arch`: peer_benchmark.twin_architecture(config)."""
    return TwinResNet(**arch)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _torch_name(flax_path: tuple[str, ...]) -> str:
    """('BasicBlock_1', 'conv1', 'kernel') -> 'blocks.1.conv1.weight'."""
    *modules, leaf = flax_path
    names = []
    for m in modules:
        names.append(f'blocks.{m.split("_")[1]}' if m.startswith('BasicBlock_') else m)
    return '.'.join([*names, 'bias' if leaf == 'bias' else 'weight'])


def flax_to_state_dict(flat_params: dict[tuple[str, ...], np.ndarray]) -> dict:
    """Flattened flax parameters {path: array} -> a TwinResNet state dict (conv HWIO -> OIHW,
    dense [in, out] -> [out, in])."""
    out = {}
    for path, value in flat_params.items():
        a = np.asarray(value, np.float32)
        if a.ndim == 4:
            a = a.transpose(3, 2, 0, 1)
        elif a.ndim == 2:
            a = a.T
        out[_torch_name(path)] = torch.tensor(a)  # a copy, never a view of the caller's array
    return out


def state_dict_to_flax(state: dict, flat_like: dict[tuple[str, ...], np.ndarray]) -> dict:
    """The inverse of `flax_to_state_dict`, on the paths of `flat_like`."""
    out = {}
    for path in flat_like:
        a = state[_torch_name(path)].detach().cpu().numpy()
        if a.ndim == 4:
            a = a.transpose(2, 3, 1, 0)
        elif a.ndim == 2:
            a = a.T
        out[path] = a
    return out


def to_tensors(split: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """A hospital's stored split -> float32 NCHW images and float32 labels, through fedjax_med's
    one decode (`data.storage.decode`)."""
    batch = storage.decode({'image': split['image'], 'label': split['label']})
    images = torch.from_numpy(np.ascontiguousarray(batch['image'].transpose(0, 3, 1, 2)))
    return images, torch.from_numpy(np.ascontiguousarray(batch['label']))


# ---------------------------------------------------------------------------------------------
# Local training: non-private (the round's own batches) and Opacus DP-SGD
# ---------------------------------------------------------------------------------------------


def reset_adam(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """A fresh Adam state each round (fedjax_med's client optimiser starts anew every round)."""
    optimizer.state.clear()
    for group in optimizer.param_groups:
        group['lr'] = lr


def train_batches(model, optimizer, images, labels, indices, mask, lr) -> int:
    """Adam steps over given batches: `indices`, `mask` [S, B] as fedjax_med's planner draws
    them (mask 0 = padding). Returns the examples trained on."""
    reset_adam(optimizer, lr)
    seen = 0
    for idx, m in zip(indices, mask, strict=True):
        keep = idx[m > 0]
        if not len(keep):
            continue  # a step beyond this hospital's share
        keep = torch.from_numpy(np.ascontiguousarray(keep, np.int64))
        optimizer.zero_grad(set_to_none=True)
        loss = F.binary_cross_entropy_with_logits(model(images[keep]), labels[keep])
        loss.backward()
        optimizer.step()
        seen += len(keep)
    return seen


class OpacusHospital:
    """One hospital's DP-SGD through Opacus: `PrivacyEngine.make_private` (flat per-example
    clipping at C, noise sigma_k * C, Poisson sampling) around the twin and Adam.

    make_private with poisson_sampling=True sets its sampling rate to 1 / len(data_loader)
    = 1 / ceil(n / B) and averages by int(n * that rate); fedjax_med samples with q = B / n and
    divides by B. So the Poisson loader is rebuilt at q = B / n (Opacus's own `DPDataLoader`)
    and the optimiser's `expected_batch_size` set to min(B, n): the same mechanism as
    fedjax_med's. A round draws `steps` Poisson batches (fedjax_med's steps per round).
    """

    def __init__(self, arch, images, labels, batch_size, noise_multiplier, clip_norm, seed):
        from opacus import PrivacyEngine
        from opacus.data_loader import DPDataLoader
        from torch.utils.data import DataLoader, TensorDataset

        n = len(images)
        model = build_twin(arch)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.0)
        dataset = TensorDataset(images, labels)
        self.engine = PrivacyEngine(accountant='rdp')
        self.model, self.optimizer, _ = self.engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=DataLoader(dataset, batch_size=batch_size),
            noise_multiplier=float(noise_multiplier),
            max_grad_norm=float(clip_norm),
            poisson_sampling=True,
        )
        generator = torch.Generator().manual_seed(int(seed))
        self.loader = DPDataLoader(
            dataset, sample_rate=min(1.0, batch_size / n), generator=generator
        )
        self.optimizer.expected_batch_size = min(batch_size, n)
        self._batches = iter(self.loader)

    def _next(self):
        try:
            return next(self._batches)
        except StopIteration:  # every Poisson batch is an independent draw: just go on
            self._batches = iter(self.loader)
            return next(self._batches)

    def train(self, state: dict, lr: float, steps: int) -> int:
        self.model._module.load_state_dict(state)
        reset_adam(self.optimizer.original_optimizer, lr)
        seen = 0
        for _ in range(steps):
            x, y = self._next()
            self.optimizer.zero_grad(set_to_none=True)
            if len(x):
                loss = F.binary_cross_entropy_with_logits(self.model(x), y)
                loss.backward()
            self.optimizer.step()
            seen += len(x)
        return seen

    def state_dict(self) -> dict:
        return self.model._module.state_dict()


def fedavg_into(model: nn.Module, states: list[dict], weights: Sequence[float]) -> None:
    """model <- sum_k w_k state_k (example-weighted FedAvg; the weights sum to 1)."""
    with torch.no_grad():
        merged = {
            name: sum(w * s[name] for w, s in zip(weights, states, strict=True))
            for name in states[0]
        }
        model.load_state_dict(merged)


class PlainFederation:
    """FedAvg by hand in PyTorch: every hospital in turn from the global model, fresh Adam,
    then the example-weighted mean. Non-private hospitals train on the batches fedjax_med's
    planner drew for the round; DP hospitals (Opacus) draw their own Poisson batches."""

    def __init__(self, arch, splits, init_state, weights, *, dp=None, seed=0):
        self.arch, self.weights = arch, list(weights)
        self.model = build_twin(arch)
        self.model.load_state_dict(init_state)
        self.data = [to_tensors(s) for s in splits]
        self.worker = build_twin(arch)
        self.optimizer = torch.optim.Adam(self.worker.parameters(), lr=0.0)
        self.hospitals = None
        if dp is not None:
            self.hospitals = [
                OpacusHospital(
                    arch,
                    x,
                    y,
                    dp['batch_size'],
                    dp['noise_multipliers'][k],
                    dp['clip_norm'],
                    seed * 1000 + k,
                )
                for k, (x, y) in enumerate(self.data)
            ]

    def round(self, lr: float, *, indices=None, mask=None, steps=None) -> int:
        """One round; non-private: `indices`, `mask` [K, S, B]; DP: `steps` [K]."""
        global_state = {k: v.clone() for k, v in self.model.state_dict().items()}
        states, seen = [], 0
        for k, (x, y) in enumerate(self.data):
            if self.hospitals is None:
                self.worker.load_state_dict(global_state)
                seen += train_batches(self.worker, self.optimizer, x, y, indices[k], mask[k], lr)
                states.append({n: v.detach().clone() for n, v in self.worker.state_dict().items()})
            else:
                seen += self.hospitals[k].train(global_state, lr, int(steps[k]))
                states.append(
                    {n: v.detach().clone() for n, v in self.hospitals[k].state_dict().items()}
                )
        fedavg_into(self.model, states, self.weights)
        return seen


# ---------------------------------------------------------------------------------------------
# Flower: ServerApp (FedAvg strategy, Message API) and ClientApp over the same hospitals
# ---------------------------------------------------------------------------------------------

_ACTOR_DATA: dict = {}  # per Ray worker process: hospital k's decoded tensors, loaded once


def _hospital_data(path: str, k: int):
    if (path, k) not in _ACTOR_DATA:
        with np.load(path) as f:
            split = {'image': f[f'image_{k}'], 'label': f[f'label_{k}']}
        _ACTOR_DATA[(path, k)] = to_tensors(split)
    return _ACTOR_DATA[(path, k)]


def make_client_app(settings: dict):
    """A ClientApp training hospital `partition-id` per message, as Flower's PyTorch and Opacus
    examples do: the twin (and, with DP, Opacus's make_private) built for the message, the data
    loaded once per worker process. `settings` (plain values, sent to the Ray workers):
    arch, data_path, threads, seed, host_batches_stream, batch_size, epochs, steps [K], and
    with DP: noise_multipliers [K], clip_norm."""
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context):
        torch.set_num_threads(settings['threads'])
        k = int(context.node_config['partition-id'])
        config = msg.content['config']
        r, lr = int(config['round']), float(config['lr'])
        state = msg.content['arrays'].to_torch_state_dict()
        x, y = _hospital_data(settings['data_path'], k)
        if settings.get('dp'):
            dp = settings['dp']
            hospital = OpacusHospital(
                settings['arch'],
                x,
                y,
                settings['batch_size'],
                dp['noise_multipliers'][k],
                dp['clip_norm'],
                settings['seed'] * 100_000 + r * 100 + k,
            )
            seen = hospital.train(state, lr, int(settings['steps'][k]))
            out = hospital.state_dict()
        else:
            model = build_twin(settings['arch'])
            model.load_state_dict(state)
            optimizer = torch.optim.Adam(model.parameters(), lr=lr)
            # The batches fedjax_med's planner draws for hospital k in round r (same stream).
            rng = np.random.default_rng([settings['seed'], r, settings['host_batches_stream'], k])
            b = batching.shuffle_batches(
                [len(x)],
                settings['batch_size'],
                settings['epochs'],
                int(settings['steps'][k]),
                lambda _: rng,
            )
            seen = train_batches(model, optimizer, x, y, b.indices[0], b.mask[0], lr)
            out = model.state_dict()
        content = RecordDict(
            {
                'arrays': ArrayRecord(out),
                'metrics': MetricRecord({'num-examples': len(x), 'examples-seen': seen}),
            }
        )
        return Message(content=content, reply_to=msg)

    return app


def make_server_app(
    init_state: dict,
    num_rounds: int,
    num_clients: int,
    lr_of_round: Callable[[int], float],
    between_rounds: Callable[[int], None],
    record: dict,
):
    """A ServerApp running Flower's FedAvg (weighted by 'num-examples') for `num_rounds`.

    Before Flower's round s >= 2 is configured, `between_rounds(s - 1)` runs the other systems'
    round s - 1, so the systems alternate round by round in this process. Flower's round time is
    from the end of that call to the end of `aggregate_train` (sending the model, the ClientApps
    in Ray, the replies, the weighted mean); `record['round_end']` gets the end times."""
    from flwr.app import ArrayRecord, ConfigRecord, Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    class AlternatingFedAvg(FedAvg):
        def configure_train(self, server_round, arrays, config, grid):
            if server_round >= 2:
                between_rounds(server_round - 1)
            record.setdefault('round_start', {})[server_round] = time.perf_counter()
            config['round'] = server_round - 1
            config['lr'] = float(lr_of_round(server_round - 1))
            return super().configure_train(server_round, arrays, config, grid)

        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            out = super().aggregate_train(server_round, replies)
            record.setdefault('round_end', {})[server_round] = time.perf_counter()
            record.setdefault('examples', {})[server_round] = sum(
                int(m.content['metrics']['examples-seen']) for m in replies if not m.has_error()
            )
            record.setdefault('errors', {})[server_round] = [
                m.error.reason for m in replies if m.has_error()
            ]
            return out

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = AlternatingFedAvg(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=num_clients,
            min_available_nodes=num_clients,
        )
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(init_state),
            num_rounds=num_rounds,
            train_config=ConfigRecord(),
        )
        record['final'] = result.arrays.to_torch_state_dict() if result.arrays else None

    return app
