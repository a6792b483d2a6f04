"""Datasets (TFDS builders, synthetic twins), hospital partitions and client batching.

sources.py            load_federated(data_config, seed) -> FederatedDataset (the entry point)
registry.py           the dataset names: the task of each, synthetic twins, real releases
storage.py            compact storage dtypes (uint8 X-rays and labels, float16 MRI) and the
                      one decode to float32 inputs, used inside the jitted round and evaluation
synthetic.py          synthetic_cxr / synthetic_brats: in-memory synthetic twins (numpy)
partition.py          patient-wise iid / dirichlet / pathological / quantity / natural
                      partitions, train/test split, per-hospital acquisition shift
nih_metadata.py       ChestX-ray14 label order, CSV parser, shipped metadata table
nih_chestxray14.py    TFDS builder: NIH ChestX-ray14 from the official release
brats.py, mri.py      TFDS builder: BraTS 2020 / 2021 / MSD Task01; NIfTI and label helpers
synthetic_builders.py TFDS builders of the synthetic twins
tfds_io.py            make / build / read builders through array_record data sources
build.py, inspect.py  command lines: build a dataset; look at a config's federation
errors.py             DataError (stops a build; one line naming file, line and problem) and
                      SkippedInput (one case or image skipped, counted by reason)
"""

from fedjax_med.data.errors import DataError, SkippedInput

__all__ = ['DataError', 'SkippedInput']
