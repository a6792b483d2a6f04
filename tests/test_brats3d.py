"""BraTS in 3-D: the patch sampler, the 3-D U-Net and its convolutions, DP-SGD on patches, the
builder's volume mode on files in the real layouts, and one federated run through `train.run`."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import traverse_util

from configs import brats as brats_configs
from fedjax_med import client, report, tasks, train, validate
from fedjax_med.data import brats, inspect, mri, partition, patches, sources, synthetic, tfds_io
from fedjax_med.models import build_model, layers
from fedjax_med.models.unet import UNet
from fedjax_med.privacy import dp_sgd, fast_clip
from tests.test_data_builders import write_brats, write_msd

BRATS_LOSS = tasks.TASKS['brats'].per_example_loss


@pytest.fixture(autouse=True, scope='module')
def fast_compiles():
    """At these tiny shapes XLA's optimisation passes cost more time than they save."""
    before = bool(jax.config.values.get('jax_disable_most_optimizations'))
    jax.config.update('jax_disable_most_optimizations', True)
    yield
    jax.config.update('jax_disable_most_optimizations', before)


# ---------------------------------------------------------------------------------------------
# Patch sampler
# ---------------------------------------------------------------------------------------------


def toy_case(tumour=True):
    """A [10, 12, 14] volume: an ellipsoidal brain (image 0 outside), a small tumour box whose
    enhancing part (ET) is a single voxel."""
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in (10, 12, 14)), indexing='ij')
    brain = (z / 0.9) ** 2 + (y / 0.9) ** 2 + (x / 0.9) ** 2 < 1
    rng = np.random.default_rng(0)
    image = (rng.uniform(0.5, 1.5, (*brain.shape, 4)) * brain[..., None]).astype(np.float32)
    regions = np.zeros((*brain.shape, 3), np.float32)
    if tumour:
        regions[3:6, 4:8, 5:9, 0] = 1  # WT
        regions[4:6, 5:7, 6:8, 1] = 1  # TC
        regions[5, 6, 7, 2] = 1  # ET: one voxel
    return image, regions


def test_sample_patches_inside_volume_fraction_and_determinism():
    image, regions = toy_case()
    kw = dict(patch_size=6, num_patches=10, tumour_fraction=0.3)
    out = patches.sample_patches(image, regions, rng=patches.case_rng(0, 7), **kw)
    assert out['image'].shape == (10, 6, 6, 6, 4) and out['label'].shape == (10, 6, 6, 6, 3)
    origins, centres = out['patch_origin'], out['centre']
    assert (origins >= 0).all() and (origins + 6 <= np.array(image.shape[:3])).all()
    assert ((centres - origins >= 0) & (centres - origins < 6)).all()  # each holds its centre
    for o, img, lab in zip(origins, out['image'], out['label'], strict=True):
        window = tuple(slice(a, a + 6) for a in o)
        np.testing.assert_array_equal(img, image[window])
        np.testing.assert_array_equal(lab, regions[window])
    # round(0.3 * 10) = 3 patches centred on tumour, the rest on brain voxels.
    np.testing.assert_array_equal(out['tumour_centred'], [1] * 3 + [0] * 7)
    at_centre = lambda a: a[tuple(centres.T)]
    assert (at_centre(regions[..., 0])[:3] == 1).all()
    assert (at_centre(np.any(image != 0, -1))[3:]).all()
    # Same seed, same patches; another seed, other patches.
    again = patches.sample_patches(image, regions, rng=patches.case_rng(0, 7), **kw)
    for key in out:
        np.testing.assert_array_equal(out[key], again[key])
    other = patches.sample_patches(image, regions, rng=patches.case_rng(1, 7), **kw)
    assert not np.array_equal(other['patch_origin'], origins)


def test_sample_patches_balances_regions_pads_small_volumes_and_tumour_free_cases():
    image, regions = toy_case()
    out = patches.sample_patches(
        image,
        regions,
        patch_size=4,
        num_patches=300,
        tumour_fraction=1.0,
        rng=np.random.default_rng(0),
    )
    # A present region is picked uniformly before its voxel, so the single ET voxel centres
    # 300 * (1/3 + 1/3 * 1/8 + 1/3 * 1/48) = 115 patches on average (sd 8), not 300/48 = 6 as
    # uniformly drawn tumour voxels would.
    on_et = regions[..., 2][tuple(out['centre'].T)].sum()
    assert 85 <= on_et <= 145
    # A volume thinner than the patch is zero-padded at its high end.
    thin = patches.sample_patches(
        image[:4],
        regions[:4],
        patch_size=6,
        num_patches=5,
        tumour_fraction=0.4,
        rng=np.random.default_rng(0),
    )
    assert thin['image'].shape == (5, 6, 6, 6, 4) and (thin['patch_origin'][:, 0] == 0).all()
    assert (thin['image'][:, 4:] == 0).all()
    # Without tumour every patch is brain-centred, whatever the fraction.
    image, regions = toy_case(tumour=False)
    none = patches.sample_patches(
        image,
        regions,
        patch_size=4,
        num_patches=5,
        tumour_fraction=1.0,
        rng=np.random.default_rng(0),
    )
    assert none['tumour_centred'].sum() == 0


def test_synthetic_patches_are_seeded_and_federated_by_case(tmp_path):
    a = synthetic.synthetic_brats_patches(6, 16, 8, 4, 0.5, seed=0)
    b = synthetic.synthetic_brats_patches(6, 16, 8, 4, 0.5, seed=0)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert a['image'].shape == (24, 8, 8, 8, 4) and a['label'].shape == (24, 8, 8, 8, 3)
    np.testing.assert_array_equal(a['patient_id'], np.repeat(np.arange(6), 4))
    assert not np.array_equal(
        synthetic.synthetic_brats_patches(6, 16, 8, 4, 0.5, seed=1)['image'], a['image']
    )
    wt, tc, et = (a['label'][..., r] for r in range(3))
    assert (tc <= wt).all() and (et <= tc).all()
    local_centre = a['centre'] - a['patch_origin']
    centred = a['tumour_centred'] == 1
    assert centred.sum() == 12  # 2 of 4 in each case (every synthetic case has a tumour)
    assert (wt[np.flatnonzero(centred), *local_centre[centred].T] == 1).all()

    cfg = ml_collections.ConfigDict(
        dict(
            name='synthetic_brats',
            data_dir='',
            manual_dir='',
            resolution=16,
            num_train=24,
            num_test=12,
            num_clients=2,
            partition='iid',
            dirichlet_alpha=0.5,
            findings_per_client=2,
            quantity_sigma=1.0,
            natural_column='grade',
            feature_skew=True,
            test_fraction=0.2,
            patch_size=8,
            patches_per_case=4,
            tumour_patch_fraction=0.5,
        )
    )
    ds = sources.load_federated(cfg, seed=0)
    full = synthetic.synthetic_brats_patches(9, 16, 8, 4, 0.5, seed=0)  # (24 + 12) / 4 cases
    owners = {}
    splits = [(h, s) for h in range(2) for s in (ds.clients_train[h], ds.clients_test[h])]
    for h, split in splits:
        assert split['image'].shape[1:] == (8, 8, 8, 4)
        for pid in np.unique(split['patient_id']):
            assert owners.setdefault(pid, (h, id(split))) == (h, id(split))  # one split each
            assert (split['patient_id'] == pid).sum() == 4  # all of a case's patches together
        # The acquisition shift keeps the background at zero and changes the rest.
        original = full['image'][np.isin(full['patient_id'], split['patient_id'])]
        assert np.any(split['image'] != 0, -1).sum() == np.any(original != 0, -1).sum()
        assert not np.allclose(np.sort(split['image'].ravel()), np.sort(original.ravel()))
    assert len(owners) == 9 and ds.info['patch_size'] == 8
    assert np.asarray(ds.info['client_train_label_counts']).shape == (2, 3)
    inspect.plot_samples(ds, str(tmp_path / 'samples.png'), per_hospital=2)
    assert os.path.getsize(tmp_path / 'samples.png') > 0


def test_acquisition_bias_field_of_a_patch_is_that_of_its_place_in_the_volume():
    rng = np.random.default_rng(0)
    plane = rng.uniform(1.0, 2.0, (1, 12, 10, 4)).astype(np.float32)

    def gain(images, **kw):
        # Noise depends only on the shape, so it cancels: out(x) - out(x / 2) = scale*bias*x/2.
        out = lambda x: partition.apply_acquisition_shift(x, 1, 'brats', seed=0, **kw)
        return 2 * (out(images) - out(images / 2)) / images

    whole = gain(plane)
    # A one-slice patch spanning the whole plane: exactly the 2-D look, noise included.
    np.testing.assert_allclose(
        partition.apply_acquisition_shift(
            plane[:, None], 1, 'brats', seed=0, origins=[[0, 0, 0]], volume_shapes=[[1, 12, 10]]
        )[:, 0],
        partition.apply_acquisition_shift(plane, 1, 'brats', seed=0),
        rtol=1e-6,
    )
    # A 3 x 4 x 5 patch at (z, y, x) = (2, 6, 3) of a [5, 12, 10] volume.
    patch = np.broadcast_to(plane[:, None, 6:10, 3:8], (1, 3, 4, 5, 4)).copy()
    np.testing.assert_allclose(
        gain(patch, origins=[[2, 6, 3]], volume_shapes=[[5, 12, 10]]),
        np.broadcast_to(whole[:, None, 6:10, 3:8], patch.shape),
        rtol=1e-4,
    )


# ---------------------------------------------------------------------------------------------
# 3-D U-Net, its convolutions, DP-SGD
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    'kernel,strides,padding',
    [
        ((3, 3, 3), (1, 1, 1), 'SAME'),
        ((3, 3, 3), (2, 1, 2), 'SAME'),
        ((2, 3, 1), (1, 2, 1), 'VALID'),
    ],
)
def test_loop_friendly_conv3d_gradients_equal_plain_conv(kernel, strides, padding):
    x = jax.random.normal(jax.random.key(0), (2, 7, 6, 5, 3))
    plain = nn.Conv(4, kernel, strides, padding=padding)
    ours = layers.Conv(4, kernel, strides, padding=padding)
    params = plain.init(jax.random.key(1), x)
    cotangent = jax.random.normal(jax.random.key(2), plain.apply(params, x).shape)
    loss = lambda m: lambda p, x: jnp.sum(m.apply(p, x) * cotangent)
    expected = jax.grad(loss(plain), argnums=(0, 1))(params, x)
    actual = jax.grad(loss(ours), argnums=(0, 1))(params, x)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, e, atol=1e-5, rtol=1e-5)
    # On CPU the custom-VJP convolution is the one that ran.
    assert 'custom_vjp' in str(jax.make_jaxpr(loss(ours))(params, x))


def test_unet_3d_output_shape_parameters_and_gradient():
    model = UNet(4, 2, 3, norm_groups=2)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 8, 4))
    variables = jax.jit(model.init)(jax.random.key(1), x)
    assert jax.eval_shape(model.apply, variables, x).shape == (2, 8, 8, 8, 3)
    kernels = {
        k: v.shape for k, v in traverse_util.flatten_dict(variables['params'], sep='/').items()
    }
    assert kernels['ConvBlock_0/Conv_0/kernel'] == (3, 3, 3, 4, 4)
    assert kernels['head/kernel'] == (1, 1, 1, 4, 3)
    # Same parameter names as the 2-D U-Net; only the kernels gain a dimension.
    flat2d = jax.eval_shape(model.init, jax.random.key(1), x[:, 0])['params']
    assert jax.tree.structure(flat2d) == jax.tree.structure(variables['params'])
    # Gradient check: along the unit gradient direction the derivative is ||grad||; compare it
    # with a central finite difference (a small step, so few ReLUs change sides).
    labels = (jax.random.uniform(jax.random.key(2), (2, 8, 8, 8, 3)) > 0.7).astype(jnp.float32)
    loss_and_grad = jax.jit(
        jax.value_and_grad(lambda v, x: jnp.mean(BRATS_LOSS(model.apply(v, x), labels)))
    )
    _, grads = loss_and_grad(variables, x)
    norm = float(optax.tree.norm(grads))
    eps = 1e-3
    step = lambda s: jax.tree.map(lambda v, g: v + s * eps * g / norm, variables, grads)
    numeric = (float(loss_and_grad(step(1.0), x)[0]) - float(loss_and_grad(step(-1.0), x)[0])) / (
        2 * eps
    )
    np.testing.assert_allclose(numeric, norm, rtol=1e-2)
    with pytest.raises(ValueError, match='add the batch axis'):
        model.apply(variables, x[0, 0, 0])


def test_dp_sgd_step_on_3d_patches_naive_and_fast():
    model = UNet(2, 2, 3, norm_groups=1)
    images = jax.random.normal(jax.random.key(0), (3, 4, 4, 4, 4))
    variables = model.init(jax.random.key(1), images)
    labels = (jax.random.uniform(jax.random.key(2), (3, 4, 4, 4, 3)) > 0.6).astype(jnp.float32)
    batch, mask = {'image': images, 'label': labels}, jnp.array([1.0, 1.0, 0.0])
    per_example = client.per_example_loss_fn(lambda v, x: model.apply(v, x), BRATS_LOSS)
    kw = dict(clip_norm=0.05, expected_batch_size=2.0)
    # Arguments, not closed-over constants (XLA would spend ages folding them); the noise
    # multiplier is traced, so one compilation serves both calls.
    naive = jax.jit(
        lambda v, b, z: dp_sgd.dp_gradient(
            per_example, v, b, mask, jax.random.key(3), noise_multiplier=z, **kw
        )
    )
    grads, aux = naive(variables, batch, 0.0)
    # By hand: each real example's gradient clipped to 0.05, summed, over the expected batch.
    one_grad = jax.jit(jax.grad(per_example))
    expected = None
    for i in range(2):
        g = one_grad(variables, {'image': images[i], 'label': labels[i]})
        norm = float(optax.tree.norm(g))
        assert norm > 0.05  # clipping is active
        g = jax.tree.map(lambda a, n=norm: a * 0.05 / n / 2.0, g)
        expected = g if expected is None else jax.tree.map(jnp.add, expected, g)
    for a, e in zip(jax.tree.leaves(grads), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, e, atol=1e-6, rtol=1e-4)
    assert float(aux['clip_fraction']) == 1.0
    noised, _ = naive(variables, batch, 1.0)
    leaves = jax.tree.leaves(noised)
    assert all(np.isfinite(x).all() for x in leaves)
    assert not all(np.allclose(a, e) for a, e in zip(leaves, jax.tree.leaves(grads), strict=True))
    # Fast clipping (norms from activations, no per-example gradients) gives the same step.
    fast, fast_aux = jax.jit(
        lambda v, b: fast_clip.dp_gradient_fast(
            model, v, b, mask, jax.random.key(3), loss_fn=BRATS_LOSS, noise_multiplier=0.0, **kw
        )
    )(variables, batch)
    np.testing.assert_allclose(fast_aux['grad_norm_mean'], aux['grad_norm_mean'], rtol=1e-4)
    for a, e in zip(jax.tree.leaves(fast), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(a, e, atol=1e-6, rtol=1e-3)


# ---------------------------------------------------------------------------------------------
# Config checks
# ---------------------------------------------------------------------------------------------


def test_patch_config_validation_messages_and_patch3d_variant():
    c = brats_configs.get_config('patch3d')
    validate.validate(c)
    assert c.data.patch_size == 64 and c.model.depth == 4
    params = jax.eval_shape(
        lambda: build_model(c.model, 'brats').init(jax.random.key(0), jnp.zeros((1, 64, 64, 64, 4)))
    )
    assert params['params']['ConvBlock_0']['Conv_0']['kernel'].shape == (3, 3, 3, 4, 16)
    c.data.patch_size = 36  # not a multiple of 2**3
    with pytest.raises(
        ValueError,
        match=r'config.data.patch_size=36 must be a multiple of '
        r'2\*\*\(model.depth-1\)=8.*use e.g. 32',
    ):
        validate.validate(c)
    c.data.patch_size = 256
    with pytest.raises(
        ValueError, match='patch_size=256 exceeds the volume size config.data.resolution=128'
    ):
        validate.validate(c)
    c.data.patch_size, c.data.tumour_patch_fraction = 64, 1.5
    with pytest.raises(ValueError, match=r'tumour_patch_fraction=1.5 must be in \[0, 1\]'):
        validate.validate(c)
    cxr = brats_configs.get_config('smoke')
    cxr.task, cxr.data.name, cxr.model.name = 'chestxray14', 'synthetic_cxr', 'resnet_small'
    cxr.data.patch_size = 8
    with pytest.raises(
        ValueError,
        match="patch_size=8 cuts 3-D patches from BraTS volumes; config.task='chestxray14'",
    ):
        validate.validate(cxr)


# ---------------------------------------------------------------------------------------------
# The builder's volume mode on files in the real layouts
# ---------------------------------------------------------------------------------------------


def _expected_volume(mods, seg, brain):
    """What the 3-D builder should store for a fixture at resolution 16 (= the in-plane size, so
    in-plane resizing is the identity): slices 1..5 have brain; voxels of 1 x 1.2 x 2.5 mm give
    round(5 * 2.5 / 1.1) = 11 axial slices, linearly interpolated (images) or nearest (labels)
    at pixel centres."""
    depth, kept = 11, np.arange(1, 6)
    src = (np.arange(depth) + 0.5) * len(kept) / depth - 0.5
    lo = np.clip(np.floor(src), 0, len(kept) - 1).astype(int)
    hi = np.minimum(lo + 1, len(kept) - 1)
    frac = np.clip(src - lo, 0, 1)[:, None, None, None]
    scored = mri.zscore_in_mask(np.moveaxis(mods, 0, -1)[None], brain[None])[0]
    planes = np.stack([brats.to_display(scored[:, :, z]) for z in kept])
    image = (1 - frac) * planes[lo] + frac * planes[hi]
    nearest = kept[np.floor((np.arange(depth) + 0.5) * len(kept) / depth).astype(int)]
    labels = np.stack([brats.to_display(seg[:, :, z]) for z in nearest])
    return image, labels


@pytest.mark.parametrize('version', ['brats2020', 'brats2021', 'msd_brain'])
def test_builder_volume_mode_on_real_layouts(tmp_path, version):
    if version == 'msd_brain':
        mods, seg, brain = write_msd(tmp_path / 'raw')
        truth = {'BRATS_001': (mods, seg, brain)}
    else:
        prefix, ext = (
            ('BraTS20_Training_', '.nii') if version == 'brats2020' else ('BraTS2021_', '.nii.gz')
        )
        truth = write_brats(tmp_path / 'raw', prefix, ext, n=2)
    builder = tfds_io.make_builder(
        version, data_dir=str(tmp_path / 'tfds'), resolution=16, volumes=True
    )
    assert builder.builder_config.name == f'{version}_r16_vol'
    tfds_io.ensure_built(builder, str(tmp_path / 'raw'))
    data = tfds_io.read_split(builder, 'train')
    assert sorted(data['case_id']) == sorted(truth)
    for row, case in enumerate(data['case_id']):
        mods, seg_brats, brain = truth[case]
        image, labels = _expected_volume(mods, seg_brats, brain)
        assert data['image'][row].shape == (11, 16, 16, 4) and data['image'].dtype == np.float16
        np.testing.assert_allclose(data['image'][row].astype(np.float32), image, atol=2e-2)
        # Labels in each release's own convention map to the same WT/TC/ET regions.
        np.testing.assert_array_equal(data['label'][row], mri.seg_to_regions(labels, 'brats'))
        if version == 'msd_brain':
            stored = np.select([labels == 2, labels == 1, labels == 4], [1, 2, 3], 0)
        else:
            stored = labels
        np.testing.assert_array_equal(data['seg'][row], stored)
        np.testing.assert_allclose(data['spacing'][row], [5 * 2.5 / 11, 1.2, 1.0], rtol=1e-6)
        assert data['first_slice'][row] == 1

    # load_federated cuts patches from the volumes, split by case.
    cfg = ml_collections.ConfigDict(
        dict(
            name=version,
            data_dir=str(tmp_path / 'tfds'),
            manual_dir=str(tmp_path / 'raw'),
            resolution=16,
            num_train=0,
            num_test=0,
            num_clients=1,
            partition='iid',
            dirichlet_alpha=0.5,
            findings_per_client=2,
            quantity_sigma=1.0,
            natural_column='grade',
            feature_skew=False,
            test_fraction=0.5,
            patch_size=8,
            patches_per_case=3,
            tumour_patch_fraction=0.7,
        )
    )
    ds = sources.load_federated(cfg, seed=0)
    everything = [ds.clients_train[0], ds.clients_test[0]]
    assert sum(len(s['image']) for s in everything) == 3 * len(truth)
    for split in everything:
        assert split['image'].shape[1:] == (8, 8, 8, 4) and split['image'].dtype == np.float16
        assert split['label'].dtype == np.uint8
        local = split['centre'] - split['patch_origin']
        centred = np.flatnonzero(split['tumour_centred'] == 1)
        assert (split['label'][centred, *local[centred].T, 0] == 1).all()
    if len(truth) > 1:
        assert not set(ds.clients_train[0]['case_id']) & set(ds.clients_test[0]['case_id'])


def test_synthetic_volumes_via_tfds_give_the_in_memory_patches(tmp_path):
    base = dict(
        data_dir=str(tmp_path / 'tfds'),
        manual_dir='',
        resolution=16,
        num_train=16,
        num_test=8,
        num_clients=2,
        partition='iid',
        dirichlet_alpha=0.5,
        findings_per_client=2,
        quantity_sigma=1.0,
        natural_column='grade',
        feature_skew=False,
        test_fraction=0.2,
        patch_size=8,
        patches_per_case=4,
        tumour_patch_fraction=0.5,
        name='synthetic_brats',
    )
    mem = sources.load_federated(ml_collections.ConfigDict(base), seed=0)
    via = sources.load_federated(
        ml_collections.ConfigDict(dict(base, synthetic_via_tfds=True)), seed=0
    )
    order = lambda d: np.lexsort([d['patch_index'], d['patient_id']])
    m, v = order(mem.test), order(via.test)
    np.testing.assert_array_equal(mem.test['patch_origin'][m], via.test['patch_origin'][v])
    np.testing.assert_array_equal(mem.test['label'][m], via.test['label'][v])
    assert mem.test['image'].dtype == via.test['image'].dtype == np.float16
    np.testing.assert_allclose(
        mem.test['image'][m].astype(np.float32), via.test['image'][v].astype(np.float32), atol=1e-2
    )


def test_largest_tumour_slice():
    regions = np.zeros((5, 4, 4, 3))
    assert mri.largest_tumour_slice(regions) == 2
    regions[1, :2, :2, 0] = 1
    regions[3, :3, :3, 0] = 1
    assert mri.largest_tumour_slice(regions) == 3


# ---------------------------------------------------------------------------------------------
# One federated run
# ---------------------------------------------------------------------------------------------


def test_train_run_3d_federated(tmp_path):
    c = brats_configs.get_config('smoke')
    c.data.patch_size = 8
    c.data.resolution = 16
    c.data.num_clients = 2
    c.data.partition = 'iid'
    c.data.num_train, c.data.num_test = 32, 16
    c.data.patches_per_case = 4
    c.model.width, c.model.depth = 4, 2
    c.num_rounds = 1
    c.local.batch_size = 4
    c.eval_batch_size = 8
    workdir = str(tmp_path / 'run')
    summary = train.run(c, workdir)
    assert summary['summary/round_traces'] == 1
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        rows = [json.loads(line) for line in f]
    assert [r['round'] for r in rows] == [1]
    for key in (
        'train/loss',
        'train/param_norm',
        'eval/mean_dice',
        'eval/dice_wt',
        'eval/dice_tc',
        'eval/dice_et',
        'eval/loss',
        'eval/own_mean_dice',
        'hospital/hospital_0/mean_dice',
        'hospital/hospital_1/mean_dice',
        'comm/bytes_up',
        'time/round_s',
    ):
        assert key in rows[0], key
    assert np.isfinite(rows[0]['train/loss'])
    assert 0.0 <= rows[0]['eval/mean_dice'] <= 1.0
    # Per-case metrics over each test case's patches stitched into its volume.
    test_cases = sources.load_federated(c.data, c.seed).test['patient_id']
    assert rows[0]['eval/num_cases'] == len(np.unique(test_cases))
    assert 0.0 <= rows[0]['eval/mean_case_dice'] <= 1.0
    assert 0.0 < rows[0]['eval/case_voxel_coverage'] <= 1.0
    assert 0.0 <= rows[0]['eval/mean_hd95'] <= np.sqrt(3 * 16**2)
    # The report draws 3-D test patches by their axial slice with the most tumour.
    os.makedirs(tmp_path / 'report')
    png = report.plot_brats_overlays([report.load_run(workdir)], str(tmp_path / 'report'), 2)
    assert png and os.path.getsize(png) > 0
