"""Tests for fedjax_med.privacy.fast_clip: per-example norms without per-example gradients, and
the fast DP-SGD gradient against the reference `dp_sgd.dp_gradient` (vmap of per-example grads)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_med import client, tasks
from fedjax_med.models import build_model, layers
from fedjax_med.models.resnet import ResNet
from fedjax_med.models.unet import UNet
from fedjax_med.privacy import dp_sgd, fast_clip

CXR_LOSS = tasks.TASKS['chestxray14'].per_example_loss
BRATS_LOSS = tasks.TASKS['brats'].per_example_loss

# name -> (model, image shape [B, H, W, C], per-example loss)
MODELS = {
    'resnet_stem1': (ResNet((1, 1), 4, 3, norm_groups=2, stem_stride=1), (5, 8, 8, 3), CXR_LOSS),
    'resnet_stem2': (ResNet((1, 1), 4, 3, norm_groups=2, stem_stride=2), (5, 16, 16, 1), CXR_LOSS),
    'unet': (UNet(4, 2, 3, norm_groups=2), (5, 8, 8, 4), BRATS_LOSS),
    'unet_leaky': (UNet(4, 2, 3, norm_groups=2, negative_slope=0.1), (5, 8, 8, 4), BRATS_LOSS),
}
MASK = jnp.array([1, 0, 1, 1, 0], bool)


def problem(name: str, dtype=jnp.float32):
    """A tiny model with perturbed (non-identity) parameters and a random batch."""
    model, shape, loss = MODELS[name]
    model = model.clone(dtype=dtype)
    images = jax.random.normal(jax.random.key(1), shape)
    variables = model.init(jax.random.key(0), images)
    # Zero-initialised scales would hide the gradients of whole branches.
    leaves, treedef = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    variables = jax.tree.unflatten(
        treedef,
        [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)],
    )
    logits = model.apply(variables, images)
    labels = (jax.random.uniform(jax.random.key(3), logits.shape) > 0.5).astype(jnp.float32)
    return model, variables, {'image': images, 'label': labels}, loss


def reference_norms(model, variables, batch, loss):
    per_example = client.per_example_loss_fn(lambda v, x: model.apply(v, x), loss)
    grads = jax.jit(jax.vmap(jax.grad(per_example), in_axes=(None, 0)))(variables, batch)
    return np.asarray(dp_sgd.global_norms(grads))


def fast_norms(model, variables, batch, loss):
    fn = jax.jit(
        lambda v, b: fast_clip.per_example_grad_norms(
            model, v, b['image'], b['label'], loss_fn=loss
        )[0]
    )
    return np.asarray(fn(variables, batch))


@functools.cache
def dp_functions(name, clip_norm, noise_multiplier):
    """(jitted dp_gradient, jitted dp_gradient_fast, variables, batch); each `(v, b, m, key)`."""
    model, variables, batch, loss = problem(name)
    kwargs = dict(clip_norm=clip_norm, noise_multiplier=noise_multiplier, expected_batch_size=2.5)
    per_example = client.per_example_loss_fn(lambda v, x: model.apply(v, x), loss)
    # Variables are arguments, not closed-over constants: XLA would spend ages folding them.
    naive = jax.jit(lambda v, b, m, k: dp_sgd.dp_gradient(per_example, v, b, m, k, **kwargs))
    fast = jax.jit(
        lambda v, b, m, k: fast_clip.dp_gradient_fast(model, v, b, m, k, loss_fn=loss, **kwargs)
    )
    return naive, fast, variables, batch


def assert_trees_close(actual, expected, rtol):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, e, rtol=rtol, atol=rtol * float(np.max(np.abs(e))))


@pytest.mark.parametrize(
    'kernel,strides,padding,dilation',
    [
        ((3, 3), (1, 1), 'SAME', 1),
        ((3, 3), (2, 2), 'SAME', 1),
        ((7, 7), (2, 2), 'SAME', 1),
        ((2, 3), (2, 1), 'VALID', 1),
        ((1, 1), (2, 2), 'SAME', 1),
        ((3, 3), (1, 2), 'SAME', 2),
        ((3, 3), (1, 1), ((2, 0), (1, 1)), 1),
    ],
)
def test_conv_patches_times_flattened_kernel_is_the_convolution(kernel, strides, padding, dilation):
    x = jax.random.normal(jax.random.key(0), (2, 9, 8, 3))
    conv = layers.Conv(5, kernel, strides, padding, kernel_dilation=dilation, use_bias=False)
    variables = conv.init(jax.random.key(1), x)
    patches = fast_clip.conv_patches(conv, x)
    hwio = variables['params']['kernel']
    expected = conv.apply(variables, x)
    np.testing.assert_allclose(
        patches @ hwio.reshape(-1, hwio.shape[-1]), expected, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize(
    'name,mode',
    [
        ('resnet_stem1', 'mixed'),
        ('resnet_stem2', 'mixed'),
        ('unet', 'mixed'),
        ('unet_leaky', 'mixed'),
        ('resnet_stem2', 'ghost'),
        ('resnet_stem2', 'direct'),
        ('unet', 'ghost'),
        ('unet', 'direct'),
    ],
)
def test_per_example_norms_match_vmap_of_grad(name, mode, monkeypatch):
    # 'mixed' picks per layer (the tiny models use both); the others force one formula everywhere.
    if mode != 'mixed':
        monkeypatch.setattr(fast_clip, '_prefers_ghost', lambda *_: mode == 'ghost')
    model, variables, batch, loss = problem(name)
    np.testing.assert_allclose(
        fast_norms(model, variables, batch, loss),
        reference_norms(model, variables, batch, loss),
        rtol=1e-5,
    )


def test_mixed_choice_uses_both_formulas():
    chosen = []

    def spy(*shape):
        chosen.append(2 * shape[0] ** 2 < shape[1] * shape[2])
        return chosen[-1]

    model, variables, batch, loss = problem('resnet_stem2')
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fast_clip, '_prefers_ghost', spy)
        fast_norms(model, variables, batch, loss)
    assert any(chosen) and not all(chosen)


def test_bfloat16_norms_are_close_to_float32_reference():
    model, variables, batch, loss = problem('resnet_stem1', dtype=jnp.bfloat16)
    f32_model = model.clone(dtype=jnp.float32)
    np.testing.assert_allclose(
        fast_norms(model, variables, batch, loss),
        reference_norms(f32_model, variables, batch, loss),
        rtol=5e-2,
    )


@pytest.mark.parametrize(
    'name,binding', [('resnet_stem1', True), ('resnet_stem1', False), ('unet', True)]
)
def test_without_noise_equals_dp_gradient(name, binding):
    model, variables, batch, loss = problem(name)
    norms = reference_norms(model, variables, batch, loss)[np.asarray(MASK)]
    clip = round(float(np.median(norms)) * 0.9, 3) if binding else 1e6
    naive_fn, fast_fn, variables, batch = dp_functions(name, clip, 0.0)
    naive, naive_aux = naive_fn(variables, batch, MASK, jax.random.key(0))
    fast, fast_aux = fast_fn(variables, batch, MASK, jax.random.key(0))
    assert jax.tree.structure(fast) == jax.tree.structure(naive)
    assert_trees_close(fast, naive, rtol=1e-5)
    assert fast_aux.keys() == naive_aux.keys() == {'clip_fraction', 'grad_norm_mean', 'loss'}
    for k in fast_aux:
        np.testing.assert_allclose(fast_aux[k], naive_aux[k], rtol=1e-5)
    assert (float(fast_aux['clip_fraction']) > 0) == binding


def test_same_key_gives_the_same_noise_as_dp_gradient():
    z, clip, key = 2.0, 0.5, jax.random.key(7)
    naive_fn, fast_fn, variables, batch = dp_functions('resnet_stem1', clip, z)
    fast, _ = fast_fn(variables, batch, MASK, key)
    # Both draw with dp_sgd.add_gaussian_noise from the same key over the same leaves, so they
    # differ only by the rounding of the clipped sums, far below the noise (std 0.4 here).
    assert_trees_close(fast, naive_fn(variables, batch, MASK, key)[0], rtol=1e-5)
    clean, _ = dp_functions('resnet_stem1', clip, 0.0)[1](variables, batch, MASK, key)
    noise = jax.tree.map(jnp.subtract, fast, clean)
    all_noise = np.concatenate([np.ravel(x) for x in jax.tree.leaves(noise)])
    assert 0.38 < float(np.std(all_noise)) < 0.42  # z * C / expected batch = 2 * 0.5 / 2.5
    other, _ = fast_fn(variables, batch, MASK, jax.random.key(8))
    assert not np.allclose(jax.tree.leaves(other)[0], jax.tree.leaves(fast)[0])


def test_masked_examples_contribute_exactly_zero_even_with_nan_data():
    _, fast, variables, batch = dp_functions('resnet_stem1', 0.5, 0.0)
    fn = lambda b, m: fast(variables, b, m, jax.random.key(0))
    poisoned = dict(
        batch, image=batch['image'].at[1].set(jnp.nan), label=batch['label'].at[4].set(jnp.nan)
    )
    grads, aux = fn(poisoned, MASK)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    # Same as the batch with the masked examples replaced by other (real) data.
    other = jax.tree.map(lambda x: x.at[1].set(x[0]).at[4].set(x[2]), batch)
    expected, expected_aux = fn(other, MASK)
    assert_trees_close(grads, expected, rtol=1e-6)
    np.testing.assert_allclose(aux['loss'], expected_aux['loss'], rtol=1e-6)
    none, none_aux = fn(batch, jnp.zeros_like(MASK))
    assert all(np.all(g == 0) for g in jax.tree.leaves(none))
    assert all(float(v) == 0 for v in none_aux.values())


def test_vmap_over_clients_matches_each_client():
    model, variables, batch, loss = problem('unet')
    fn = functools.partial(
        fast_clip.dp_gradient_fast,
        model,
        loss_fn=loss,
        clip_norm=0.5,
        noise_multiplier=0.0,
        expected_batch_size=2.0,
    )
    batches = jax.tree.map(lambda x: jnp.stack([x, x[::-1]]), batch)
    masks = jnp.stack([MASK, MASK[::-1]])
    keys = jax.random.split(jax.random.key(0), 2)
    stacked, _ = jax.jit(jax.vmap(fn, in_axes=(None, 0, 0, 0)))(variables, batches, masks, keys)
    for i in range(2):
        single, _ = jax.jit(fn)(
            variables, jax.tree.map(lambda x, i=i: x[i], batches), masks[i], keys[i]
        )
        assert_trees_close(jax.tree.map(lambda x, i=i: x[i], stacked), single, rtol=1e-5)


def test_layers_leave_parameters_and_plain_apply_unchanged():
    config = type(
        'C',
        (),
        {'compute_dtype': 'float32', 'name': 'resnet18', 'norm_groups': 32, 'negative_slope': 0.0},
    )
    resnet18 = build_model(config, 'chestxray14')
    variables = jax.eval_shape(resnet18.init, jax.random.key(0), jnp.zeros((1, 64, 64, 1)))
    assert set(variables) == {'params'}  # no perturbations or activations recorded by init
    assert sum(x.size for x in jax.tree.leaves(variables)) == 11_177_422
    block = variables['params']['BasicBlock_1']
    assert set(block) == {'conv1', 'conv2', 'GroupNorm_0', 'GroupNorm_2'}
    assert set(block['GroupNorm_2']) == {'scale', 'bias'}

    model, variables, batch, _ = problem('unet')
    assert set(variables) == {'params'}
    out = model.apply(variables, batch['image'])
    assert isinstance(out, jax.Array) and out.shape == (5, 8, 8, 3)


def test_group_norm_matches_flax():
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 6)) * 3 + 1
    ours, theirs = layers.GroupNorm(num_groups=3), nn.GroupNorm(num_groups=3)
    variables = theirs.init(jax.random.key(1), x)
    variables = jax.tree.map(lambda p: p + jax.random.normal(jax.random.key(2), p.shape), variables)
    assert jax.tree.structure(ours.init(jax.random.key(1), x)) == jax.tree.structure(variables)
    np.testing.assert_allclose(ours.apply(variables, x), theirs.apply(variables, x), atol=1e-5)


def test_support_check():
    assert fast_clip.supports_fast_clipping(MODELS['resnet_stem1'][0])
    assert fast_clip.supports_fast_clipping(MODELS['unet'][0])

    class FlaxDense(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(x.reshape(x.shape[0], -1))

    model = FlaxDense()
    assert not fast_clip.supports_fast_clipping(model)
    x = jnp.ones((2, 3))
    with pytest.raises(ValueError, match='Dense_0'):
        fast_clip.dp_gradient_fast(
            model,
            model.init(jax.random.key(0), x),
            {'image': x, 'label': jnp.ones((2, 2))},
            jnp.ones(2, bool),
            jax.random.key(0),
            loss_fn=CXR_LOSS,
            clip_norm=1.0,
            noise_multiplier=0.0,
            expected_batch_size=2.0,
        )
