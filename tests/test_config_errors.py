"""Config errors at start-up: one message per problem naming the field, the value and the fix; on
the command line one line each and exit status 2, no traceback. Validation only: nothing trains."""

import itertools
import os
import subprocess
import sys

import ml_collections
import nibabel as nib
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from configs import base, brats, chestxray14
from fedjax_med.aggregation import secagg_host, secagg_protocol
from fedjax_med.data import brats as brats_data
from fedjax_med.data import mri
from fedjax_med.validate import ConfigError, validate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def problems(config) -> list[str]:
    with pytest.raises(ConfigError) as e:
        validate(config)
    return e.value.problems


def smoke(task='chestxray14', **fields):
    c = (chestxray14 if task == 'chestxray14' else brats).get_config('smoke')
    for dotted, value in fields.items():
        *parents, leaf = dotted.split('__')
        node = c
        for name in parents:
            node = node[name]
        node[leaf] = value
    return c


# ---------------------------------------------------------------------------------------------
# DP settings that would be ignored, unknown choices
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize('field,value', [('noise_multiplier', 1.0), ('target_epsilon', 3.0)])
def test_dp_values_without_a_dp_mode_are_an_error_naming_both_fields(field, value):
    (msg,) = problems(smoke(**{f'dp__{field}': value}))
    assert msg.startswith(f"config.dp.{field}={value} would be ignored: config.dp.mode='none'")
    assert "Set config.dp.mode='sample'" in msg and "or 'client'" in msg
    assert f'or set config.dp.{field}=0 to train without DP' in msg


def test_both_dp_values_without_a_dp_mode_are_one_message():
    (msg,) = problems(smoke(dp__noise_multiplier=1.0, dp__target_epsilon=3.0))
    assert 'config.dp.noise_multiplier=1.0 and config.dp.target_epsilon=3.0 would be ignored' in msg
    assert 'set config.dp.noise_multiplier=0 and config.dp.target_epsilon=0' in msg


def test_adaptive_clipping_with_dp_sgd_is_an_error():
    (msg,) = problems(
        smoke(
            dp__mode='sample',
            dp__noise_multiplier=1.0,
            local__sampling='poisson',
            dp__adaptive_clip=True,
        )
    )
    assert msg.startswith('config.dp.adaptive_clip=True adapts the clip norm of hospital updates')
    assert msg.endswith('Set config.dp.adaptive_clip=False.')


def test_pathological_brats_split_that_would_be_iid_is_an_error():
    (msg,) = problems(smoke('brats', data__partition='pathological'))
    assert msg.startswith(
        'config.data.findings_per_client=3 with '
        "config.data.partition='pathological' gives every BraTS hospital all 3"
    )
    validate(smoke('brats', data__partition='pathological', data__findings_per_client=2))


def test_an_unknown_dp_mode_is_one_error_with_a_suggestion():
    assert problems(smoke(dp__mode='Sample')) == [
        "config.dp.mode='Sample' is not known; use one of 'none', 'sample', 'client'. "
        "Did you mean 'sample'?"
    ]
    (msg,) = problems(smoke(model__name='unett', task='brats'))  # not also "cannot segment"
    assert "config.model.name='unett' is not known" in msg and "Did you mean 'unet'?" in msg


def test_every_shipped_config_variant_is_valid():
    for variant in ('', 'synthetic', 'smoke', 'dp', 'patch3d'):
        validate(brats.get_config(variant))
    for variant in (
        '',
        'synthetic',
        'smoke',
        'dp',
        'nih_scale',
        'nih_scale_dp',
        'nih_public',
        'cross_device',
    ):
        validate(chestxray14.get_config(variant))


# ---------------------------------------------------------------------------------------------
# Data fields that failed deep in the readers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    'fields,expected',
    [
        (
            {'data__quantity_sigma': -1.0, 'data__partition': 'quantity'},
            'config.data.quantity_sigma=-1.0 must be >= 0.',
        ),
        ({'data__slices_per_case': 0}, 'config.data.slices_per_case=0 must be > 0.'),
        (
            {'data__num_train': 0},
            'config.data.num_train=0 must be > 0: the synthetic twin generates',
        ),
        ({'data__num_test': 0}, 'config.data.num_test=0 must be > 0: without test examples'),
        ({'data__dirichlet_alpha': 0.0}, 'config.data.dirichlet_alpha=0.0 must be > 0.'),
        ({'data__test_fraction': 1.0}, 'config.data.test_fraction=1.0 must be in [0, 1)'),
        ({'data__empty_slice_stride': 0}, 'config.data.empty_slice_stride=0 must be > 0.'),
        ({'data__max_cases': -1}, 'config.data.max_cases=-1 must be >= 0.'),
    ],
)
def test_data_fields_are_checked_up_front(fields, expected):
    (msg,) = problems(smoke('brats', **fields))
    assert msg.startswith(expected), msg


def test_readers_options_are_config_fields_with_the_readers_defaults():
    data = base.get_base_config().data
    assert (
        data.max_cases,
        data.brain_slices_only,
        data.empty_slice_stride,
        data.synthetic_via_tfds,
    ) == (0, True, 1, False)


def test_readers_options_can_be_overridden_on_the_command_line():
    fv = flags.FlagValues()
    argv = [
        'prog',
        '--config=configs/brats.py:smoke',
        '--config.data.max_cases=7',
        '--noconfig.data.brain_slices_only',
        '--config.data.empty_slice_stride=3',
        '--config.data.synthetic_via_tfds',
    ]
    holder = config_flags.DEFINE_config_file('config', flag_values=fv, sys_argv=argv)
    fv(argv)
    data = holder.value.data
    assert (
        data.max_cases,
        data.brain_slices_only,
        data.empty_slice_stride,
        data.synthetic_via_tfds,
    ) == (7, False, 3, True)


def test_reader_options_without_effect_are_errors():
    (msg,) = problems(smoke('brats', data__max_cases=3))
    assert msg.startswith(
        'config.data.max_cases=3 subsets BraTS cases read through TFDS; it has '
        "no effect with config.data.name='synthetic_brats' unless "
        'config.data.synthetic_via_tfds=True.'
    )
    validate(smoke('brats', data__max_cases=3, data__synthetic_via_tfds=True))
    (msg,) = problems(smoke('brats', data__brain_slices_only=False))
    assert msg.startswith('config.data.brain_slices_only=False: options of the real BraTS builder')
    real = brats.get_config('')
    real.data.brain_slices_only, real.data.empty_slice_stride, real.data.max_cases = False, 2, 50
    validate(real)
    real.data.patch_size = 64
    (msg,) = problems(real)
    assert msg.startswith(
        'config.data.empty_slice_stride=2 thins 2-D slices, but '
        'config.data.patch_size=64 reads 3-D volumes'
    )


# ---------------------------------------------------------------------------------------------
# Secure aggregation: every configuration that would stop mid-run is refused at start-up
# ---------------------------------------------------------------------------------------------


def secagg(num_clients, per_round=0, neighbours=0, threshold=0, dropout=0.0):
    return smoke(
        data__num_clients=num_clients,
        clients_per_round=per_round,
        secagg__enabled=True,
        secagg__neighbours=neighbours,
        secagg__threshold=threshold,
        secagg__dropout_fraction=dropout,
    )


def test_secagg_needs_two_hospitals_per_round():
    (msg,) = problems(secagg(4, per_round=1))
    assert msg == (
        'config.secagg.enabled=True needs at least 2 hospitals per round (the sum of '
        "one hospital's update is that update), but config.clients_per_round=1. Set "
        'config.clients_per_round >= 2 (0 = all), or config.secagg.enabled=False.'
    )
    (msg,) = problems(secagg(1))
    assert 'but config.data.num_clients=1. Set config.data.num_clients >= 2' in msg
    validate(secagg(4, per_round=2))


def test_secagg_plus_odd_degree_on_an_odd_cohort():
    (msg,) = problems(secagg(7, per_round=5, neighbours=3))
    assert msg.startswith(
        'config.secagg.neighbours=3 is odd and so is the cohort '
        '(config.clients_per_round=5 hospitals per round): no 3-regular'
    )
    assert 'Use an even config.secagg.neighbours (2 or 4) or 0 for the complete graph.' in msg
    validate(secagg(6, neighbours=3))  # 6 x 3 is even


def test_secagg_threshold_above_the_degree():
    (msg,) = problems(secagg(4, threshold=4))
    assert msg.startswith(
        'config.secagg.threshold=4 exceeds the 3 hospitals each one shares its secrets with'
    )
    assert 'use a threshold in [1, 3], or 0 for the default majority (2).' in msg


def test_secagg_dropout_beyond_the_threshold_names_the_fixes():
    (msg,) = problems(secagg(10, neighbours=4, dropout=0.3))
    assert msg.startswith(
        'config.secagg.dropout_fraction=0.3 drops 3 of the 10 hospitals of '
        'each round. Each hospital shares its secrets with its '
        'config.secagg.neighbours=4 neighbours; when all 3 dropped are among '
        'them, only 1 answer the unmasking, fewer than the Shamir threshold t=3'
    )
    assert 'Raise config.secagg.neighbours to at least 7 (or 0 for the complete graph)' in msg
    assert 'lower config.secagg.threshold to at most 1' in msg
    assert 'lower config.secagg.dropout_fraction below 0.2 (at most 1 of 10 dropping)' in msg
    validate(secagg(10, neighbours=7, dropout=0.3))
    (msg,) = problems(secagg(5, dropout=0.5))  # complete graph: every round fails
    assert 'no round can remove the masks and the run stops in its first round' in msg


def _protocol_outcome(config, rounds: int) -> str:
    """'ok', 'failed' (RoundFailedError in some round) or 'invalid' (ValueError), running the
    host protocol exactly as a run does (all hospitals take part: clients_per_round=0)."""
    k = config.data.num_clients
    try:
        for r in range(rounds):
            secagg_host.secagg_round(config, r, np.ones(k, bool), k)
    except secagg_protocol.RoundFailedError:
        return 'failed'
    except ValueError:
        return 'invalid'
    return 'ok'


def test_secagg_validation_agrees_with_the_protocol():
    # Accepted settings never fail over many rounds; refused ones fail (complete graph: in the
    # first round; SecAgg+: in some round, when the dropouts happen to be one's neighbours).
    outcomes = {}
    for m, dropout in itertools.product((3, 4, 5, 6), (0.0, 0.2, 0.34, 0.5)):
        for neighbours, threshold in itertools.product(range(m), range(m)):
            c = secagg(m, neighbours=neighbours, threshold=threshold, dropout=dropout)
            try:
                validate(c)
                expected = 'ok'
            except ConfigError as e:
                (msg,) = e.problems
                expected = 'failed' if 'dropout_fraction' in msg else 'invalid'
            got = _protocol_outcome(c, rounds=5)
            outcomes[expected] = outcomes.get(expected, 0) + 1
            assert got == expected, (m, dropout, neighbours, threshold, got, expected)
    assert min(outcomes.values()) > 5  # every kind was exercised


# ---------------------------------------------------------------------------------------------
# BraTS label conventions
# ---------------------------------------------------------------------------------------------


def test_label_values_match_np_unique():
    rng = np.random.default_rng(0)
    for seg in (
        rng.integers(0, 5, (4, 5, 3)),
        rng.integers(-2, 3, (6,)),
        np.array([70000, 1]),
        rng.random((3, 3)),
        np.zeros((0,), np.int64),
    ):
        np.testing.assert_array_equal(mri.label_values(seg), np.unique(seg))


def test_brats_labels_outside_the_convention_are_a_clear_error():
    seg = np.array([[0, 1], [2, 4]])
    mri.check_labels(seg, 'brats', 'case A')
    with pytest.raises(mri.LabelError) as e:
        mri.check_labels(np.array([[0, 1], [2, 3]]), 'brats', 'case BraTS-GLI-00000-000')
    msg = str(e.value)
    assert msg.startswith(
        'case BraTS-GLI-00000-000: segmentation holds label(s) [3] (all values: '
        "[0, 1, 2, 3]), outside the 'brats' convention"
    )
    assert 'BraTS 2021 marks enhancing tumour with 4' in msg
    assert 'BraTS 2023 convention (enhancing tumour = 3) must be remapped (3 -> 4)' in msg
    mri.check_labels(np.array([0, 1, 2, 3]), 'msd', 'case B')
    with pytest.raises(mri.LabelError, match=r'case C: segmentation holds label\(s\) \[4\]'):
        mri.check_labels(np.array([0, 4]), 'msd', 'case C')


def test_a_brats_case_with_label_3_stops_the_build_naming_the_case(tmp_path):
    folder = tmp_path / 'BraTS-GLI-00001-000'
    folder.mkdir()
    affine = np.eye(4)
    rng = np.random.default_rng(0)
    for m in mri.MODALITIES:
        nib.save(
            nib.Nifti1Image(rng.random((4, 4, 3)).astype(np.float32) + 1, affine),
            str(folder / f'{folder.name}_{m}.nii.gz'),
        )
    seg = np.zeros((4, 4, 3), np.float32)
    seg[1, 1, 1], seg[2, 2, 1] = 3, 2
    nib.save(nib.Nifti1Image(seg, affine), str(folder / f'{folder.name}_seg.nii.gz'))
    (case,) = brats_data.find_brats_cases(tmp_path)
    with pytest.raises(
        mri.LabelError,
        match=r'case BraTS-GLI-00001-000 \(.*_seg.nii.gz\): '
        r'segmentation holds label\(s\) \[3\]',
    ):
        brats_data.load_case(case, 'brats2021')
    # The builder does not skip it as a broken case: the whole release is in another convention.
    from fedjax_med.data import tfds_io

    builder = tfds_io.make_builder('brats2021', data_dir=str(tmp_path / 'tfds'), resolution=4)
    with pytest.raises(mri.LabelError):
        next(builder._generate_examples([case], None))


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, '-m', 'fedjax_med.main', *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_unknown_override_is_one_line_with_close_matches(tmp_path):
    out = run_cli(
        '--config=configs/brats.py:smoke', f'--workdir={tmp_path}', '--config.slices_per_case=3'
    )
    assert out.returncode == 2 and 'Traceback' not in out.stderr
    assert out.stderr.splitlines() == [
        'fedjax_med: config error: --config.slices_per_case: config has no field '
        "'slices_per_case'. Did you mean --config.data.slices_per_case or "
        '--config.data.patches_per_case? Every field is listed, with a comment, in '
        'configs/base.py.'
    ]


def test_cli_invalid_config_is_one_line_per_problem_and_nothing_runs(tmp_path):
    out = run_cli(
        '--config=configs/brats.py:smoke',
        f'--workdir={tmp_path / "w"}',
        '--config.data.slices_per_case=0',
        '--config.dp.target_epsilon=3',
    )
    assert out.returncode == 2 and 'Traceback' not in out.stderr
    lines = out.stderr.splitlines()
    assert lines[0] == 'fedjax_med: config error: config.data.slices_per_case=0 must be > 0.'
    assert lines[1].startswith(
        'fedjax_med: config error: config.dp.target_epsilon=3.0 would be '
        "ignored: config.dp.mode='none'"
    )
    assert len(lines) == 2 and not (tmp_path / 'w').exists()


def test_unknown_field_problem_walks_nested_fields():
    from fedjax_med.validate import unknown_field_problem

    c = base.get_base_config()
    assert unknown_field_problem(c, 'data.max_cases') is None
    assert 'Did you mean --config.dp.clip_norm' in unknown_field_problem(c, 'data.clip_norm')
    assert unknown_field_problem(c, 'dp.mode.x').startswith(
        "--config.dp.mode.x: config has no field 'dp.mode.x'."
    )
    assert unknown_field_problem(ml_collections.ConfigDict({'a': 1}), 'zzz').endswith(
        'Every field is listed, with a comment, in configs/base.py.'
    )


# ---------------------------------------------------------------------------------------------
# configs/ is a folder of the repository, not an installed package
# ---------------------------------------------------------------------------------------------


def test_configs_is_not_installed_and_a_task_config_loads_by_path_without_it(monkeypatch):
    import importlib.util
    import tomllib

    with open(os.path.join(REPO, 'pyproject.toml'), 'rb') as f:
        find = tomllib.load(f)['tool']['setuptools']['packages']['find']
    assert find['include'] == ['fedjax_med*']

    class NoConfigs:  # as where `configs` is neither installed nor on sys.path
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name.partition('.')[0] == 'configs':
                raise ModuleNotFoundError(f'No module named {name!r}')
            return None

    monkeypatch.setattr(sys, 'meta_path', [NoConfigs(), *sys.meta_path])
    for name in [m for m in sys.modules if m.partition('.')[0] == 'configs']:
        monkeypatch.delitem(sys.modules, name)
    for task in ('brats', 'chestxray14'):
        # What config_flags does with --config=PATH: a module of no package, from its file.
        spec = importlib.util.spec_from_file_location(
            f'{task}_config', os.path.join(REPO, 'configs', f'{task}.py')
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert module.base.__file__ == os.path.join(REPO, 'configs', 'base.py')
        config = module.get_config('smoke')
        assert config.task == task
        validate(config)
    assert 'configs' not in sys.modules
