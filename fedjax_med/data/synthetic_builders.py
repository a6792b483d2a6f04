"""TFDS builders of the synthetic twins, so the synthetic data can take the same array_record path
as the real datasets (`data_config.synthetic_via_tfds`). No manual download, no TensorFlow.

One config per (resolution, size, seed): `SyntheticConfig(resolution=64, num_examples=2500,
seed=0)`. CXR images are stored as 8-bit PNG (so values are quantised to 1/255), BraTS slices as
float16; `SyntheticConfig(volumes=True)` stores each synthetic BraTS case as one float16 volume
[R, R, R, 4] with uint8 regions, which load_federated cuts into 3-D patches like the real volumes.
Each builder has a single 'train' split that load_federated partitions like any other.
"""

from __future__ import annotations

import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from fedjax_med.data import nih_metadata, synthetic


class SyntheticConfig(tfds.core.BuilderConfig):
    """Image side, number of examples (CXR images / BraTS cases), generator seed, and for BraTS
    the slices per case or whole volumes (`volumes`)."""

    def __init__(
        self,
        *,
        resolution: int = 64,
        num_examples: int = 2500,
        seed: int = 0,
        slices_per_case: int = 16,
        volumes: bool = False,
        **kwargs,
    ):
        layout = 'vol' if volumes else f'z{slices_per_case}'
        super().__init__(
            name=f'r{resolution}_n{num_examples}_s{seed}_{layout}',
            description='synthetic twin',
            **kwargs,
        )
        self.resolution = resolution
        self.num_examples = num_examples
        self.seed = seed
        self.slices_per_case = slices_per_case
        self.volumes = volumes


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.rint(np.clip(image, 0, 1) * 255).astype(np.uint8)).save(buf, format='PNG')
    return buf.getvalue()


class SyntheticCxr(tfds.core.GeneratorBasedBuilder):
    """Synthetic chest radiographs with real NIH label vectors and demographics."""

    name = 'synthetic_cxr'
    VERSION = tfds.core.Version('1.0.0')
    BUILDER_CONFIGS = [SyntheticConfig()]

    def _info(self) -> tfds.core.DatasetInfo:
        r = self.builder_config.resolution
        return tfds.core.DatasetInfo(
            builder=self,
            description=synthetic.__doc__.split('\n\n')[0],
            features=tfds.features.FeaturesDict(
                {
                    'image': tfds.features.Image(shape=(r, r, 1), encoding_format='png'),
                    'label': tfds.features.Tensor(
                        shape=(len(nih_metadata.CXR_LABELS),), dtype=np.uint8
                    ),
                    'patient_id': np.int64,
                    'follow_up': np.int32,
                    'age': np.int32,
                    'sex': tfds.features.ClassLabel(names=list(nih_metadata.SEXES)),
                    'view': tfds.features.ClassLabel(names=list(nih_metadata.VIEWS)),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {'train': self._generate_examples()}

    def _generate_examples(self):
        cfg = self.builder_config
        rows = synthetic.sample_cxr_metadata(cfg.num_examples, cfg.seed)
        data = synthetic.synthetic_cxr(cfg.num_examples, cfg.resolution, cfg.seed, rows)
        for i in range(cfg.num_examples):
            yield (
                i,
                {
                    'image': _png(data['image'][i, ..., 0]),
                    'label': data['label'][i].astype(np.uint8),
                    'patient_id': int(data['patient_id'][i]),
                    'follow_up': int(data['follow_up'][i]),
                    'age': int(data['age'][i]),
                    'sex': int(data['sex'][i]),
                    'view': int(data['view'][i]),
                },
            )


class SyntheticBrats(tfds.core.GeneratorBasedBuilder):
    """Synthetic multi-modal brain-tumour slices or volumes (num_examples = cases)."""

    name = 'synthetic_brats'
    VERSION = tfds.core.Version('1.0.0')
    BUILDER_CONFIGS = [SyntheticConfig(num_examples=150)]

    def _info(self) -> tfds.core.DatasetInfo:
        r = self.builder_config.resolution
        if self.builder_config.volumes:
            return tfds.core.DatasetInfo(
                builder=self,
                description='Synthetic twin of BraTS, one 3-D volume per case.',
                features=tfds.features.FeaturesDict(
                    {
                        'image': tfds.features.Tensor(
                            shape=(r, r, r, 4), dtype=np.float16, encoding='zlib'
                        ),
                        'label': tfds.features.Tensor(
                            shape=(r, r, r, 3), dtype=np.uint8, encoding='zlib'
                        ),
                        'case_id': np.int64,
                        'patient_id': np.int64,
                        'grade': np.int32,
                    }
                ),
            )
        return tfds.core.DatasetInfo(
            builder=self,
            description='Synthetic twin of BraTS.',
            features=tfds.features.FeaturesDict(
                {
                    'image': tfds.features.Tensor(
                        shape=(r, r, 4), dtype=np.float16, encoding='zlib'
                    ),
                    'label': tfds.features.Tensor(shape=(r, r, 3), dtype=np.uint8, encoding='zlib'),
                    'case_id': np.int64,
                    'patient_id': np.int64,
                    'slice_index': np.int32,
                    'has_tumor': np.int32,
                    'grade': np.int32,
                }
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {'train': self._generate_examples()}

    def _generate_examples(self):
        cfg = self.builder_config
        if cfg.volumes:
            for case in synthetic.synthetic_brats_volumes(
                cfg.num_examples, cfg.resolution, cfg.seed
            ):
                yield (
                    case['case_id'],
                    {
                        'image': case['image'].astype(np.float16),
                        'label': case['label'].astype(np.uint8),
                        **{k: case[k] for k in ('case_id', 'patient_id', 'grade')},
                    },
                )
            return
        data = synthetic.synthetic_brats(
            cfg.num_examples, cfg.resolution, cfg.slices_per_case, cfg.seed
        )
        for i in range(len(data['image'])):
            yield (
                i,
                {
                    'image': data['image'][i].astype(np.float16),
                    'label': data['label'][i].astype(np.uint8),
                    **{
                        k: int(data[k][i])
                        for k in ('case_id', 'patient_id', 'slice_index', 'has_tumor', 'grade')
                    },
                },
            )
