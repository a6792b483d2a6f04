"""The inspect tool: text summary and both PNGs on a tiny synthetic federation."""

import ml_collections

from fedjax_med.data import inspect, sources


def test_describe_and_plots(tmp_path):
    for name in ('synthetic_cxr', 'synthetic_brats'):
        cfg = ml_collections.ConfigDict(
            dict(
                name=name,
                data_dir='',
                manual_dir='',
                resolution=16,
                num_train=64,
                num_test=16,
                num_clients=2,
                partition='dirichlet',
                dirichlet_alpha=0.5,
                findings_per_client=2,
                quantity_sigma=1.0,
                natural_column='view',
                feature_skew=True,
                test_fraction=0.2,
                slices_per_case=4,
            )
        )
        ds = sources.load_federated(cfg, seed=0)
        text = inspect.describe(ds)
        assert 'hospital_1' in text and 'total' in text
        assert ('Ptx' in text) == (name == 'synthetic_cxr')
        inspect.plot_label_mix(ds, str(tmp_path / f'{name}_mix.png'))
        inspect.plot_samples(ds, str(tmp_path / f'{name}_samples.png'), 3)
        assert (tmp_path / f'{name}_mix.png').stat().st_size > 1000
        assert (tmp_path / f'{name}_samples.png').stat().st_size > 1000
