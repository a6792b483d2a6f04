"""Poisoning attacks, simulated inside the jitted round: what `config.attack` makes the malicious
hospitals do (off by default: `attack.mode='none'` changes nothing and adds no metric).

Who: the first f = `attack.num_malicious` hospitals, ids 0 .. f-1 in the federation's hospital
order (data/partition.py's hospitals; `malicious_hospitals`). Fixing the ids keeps a run a function
of its config, and f = 1, 2 takes nested sets. The host marks them per hospital and the round
planner takes the marks to the round's slots (`RoundInputs.malicious`, float32 [M], 1 =
malicious), so a malicious hospital attacks whichever slot it takes, and whether a hospital is
malicious is an input of the round, not part of the compiled program.

What (`attack.mode`):

  label_flip  the malicious hospitals train on flipped labels: every label y becomes 1 - y (each
              of the 14 chest X-ray findings; each BraTS region mask voxel);
  sign_flip   they send -scale * their honest update (`attack.scale`);
  scale       they send +scale * their honest update (a boosted update, as in model replacement);
  backdoor    chest X-ray only: in every local step the first round(`attack.backdoor_fraction`
              * B) example slots of a malicious hospital's batch (B slots; the batches are
              shuffled, so over the rounds they are random images) are stamped with the trigger,
              a bright (1.0) square of `attack.trigger_size` pixels in the bottom-right corner,
              and their label for the finding `attack.backdoor_target` is set on (the other
              findings are left as they are). The evaluation then adds `eval/backdoor_success`:
              of the global test images without the target finding, the fraction predicted to
              have it (probability > 0.5) once the trigger is stamped on them.

label_flip and backdoor change the batch a malicious hospital trains on (`poison_batch`, bound
into `client.local_update`; the choice is a `jnp.where` on the slot's flag, so under vmap every
slot computes both and the flag selects); sign_flip and scale change the update it sends, after
its local steps and before compression, clipping, SecAgg or aggregation (`tamper_updates`, in
`rounds.build_round_fn`). The round's `train/nonfinite_updates` counts the updates as sent.

Nothing here draws randomness: which example slots carry the trigger is fixed by position.
`attack.num_malicious = 0` with a mode is the baseline of that mode (for a backdoor, how often a
clean model predicts the target on triggered images).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fedjax_med.data.nih_metadata import CXR_LABELS

MODES = ('none', 'label_flip', 'sign_flip', 'scale', 'backdoor')
BATCH_MODES = ('label_flip', 'backdoor')  # change what the malicious hospitals train on
UPDATE_MODES = ('sign_flip', 'scale')  # change the update they send
TRIGGER_VALUE = 1.0  # the brightest decoded chest X-ray pixel (storage.py: 255 / 255)

PyTree = Any


def enabled(config: ml_collections.ConfigDict) -> bool:
    """Whether the run simulates an attack (`attack.mode` other than 'none')."""
    attack = config.get('attack')
    return attack is not None and attack.get('mode', 'none') != 'none'


def malicious_hospitals(config: ml_collections.ConfigDict, num_padded: int) -> np.ndarray | None:
    """float32 [K_pad]: 1 for the malicious hospitals 0 .. f-1, or None without an attack."""
    if not enabled(config):
        return None
    flags = np.zeros(num_padded, np.float32)
    flags[: int(config.attack.num_malicious)] = 1.0
    return flags


def target_index(config: ml_collections.ConfigDict) -> int:
    """The index of `attack.backdoor_target` among the chest X-ray findings (model outputs)."""
    return CXR_LABELS.index(config.attack.backdoor_target)


def stamp_trigger(images: jax.Array, size: int) -> jax.Array:
    """float images [B, H, W, C] with the trigger: the bottom-right size x size pixels set to
    TRIGGER_VALUE in every channel."""
    return images.at[:, -size:, -size:, :].set(TRIGGER_VALUE)


def poison_batch(config: ml_collections.ConfigDict) -> Callable | None:
    """`(decoded batch, malicious flag of the slot) -> batch` for label_flip / backdoor (the
    batch as the malicious hospital trains on it; an honest one's unchanged), or None."""
    if not enabled(config) or config.attack.mode not in BATCH_MODES:
        return None
    attack = config.attack
    if attack.mode == 'label_flip':

        def flip(batch: dict, malicious: jax.Array) -> dict:
            return {
                **batch,
                'label': jnp.where(malicious > 0, 1.0 - batch['label'], batch['label']),
            }

        return flip
    target, size, fraction = (
        target_index(config),
        int(attack.trigger_size),
        attack.backdoor_fraction,
    )

    def backdoor(batch: dict, malicious: jax.Array) -> dict:
        images, labels = batch['image'], batch['label']
        slots = images.shape[0]
        poisoned = (jnp.arange(slots) < max(1, round(fraction * slots))) & (malicious > 0)
        return {
            **batch,
            'image': jnp.where(poisoned[:, None, None, None], stamp_trigger(images, size), images),
            'label': jnp.where(poisoned[:, None], labels.at[:, target].set(1.0), labels),
        }

    return backdoor


def tamper_updates(config: ml_collections.ConfigDict) -> Callable | None:
    """`(stacked updates [M, ...], malicious [M]) -> the updates as sent` for sign_flip / scale
    (the malicious rows times -scale / +scale), or None."""
    if not enabled(config) or config.attack.mode not in UPDATE_MODES:
        return None
    factor = float(config.attack.scale) * (-1.0 if config.attack.mode == 'sign_flip' else 1.0)

    def tamper(deltas: PyTree, malicious: jax.Array) -> PyTree:
        def one(d):
            attacker = (malicious > 0).reshape((-1,) + (1,) * (d.ndim - 1))
            return jnp.where(attacker, d * jnp.asarray(factor, d.dtype), d)

        return jax.tree.map(one, deltas)

    return tamper


def backdoor_success(stats: dict, target: int) -> float:
    """Of the evaluated (triggered) examples whose label lacks the target finding, the fraction
    whose predicted probability of it exceeds 0.5; NaN when there is none. `stats`: a split's
    unbatched chest X-ray statistics (tasks.py: 'probs', 'labels', 'mask')."""
    keep = (np.asarray(stats['mask']) > 0) & (np.asarray(stats['labels'])[:, target] < 0.5)
    if not keep.any():
        return float('nan')
    return float(np.mean(np.asarray(stats['probs'])[keep, target] > 0.5))
