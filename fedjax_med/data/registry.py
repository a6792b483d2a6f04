"""The dataset names (`data.name`): the task each one serves, which are synthetic twins and which
are real releases.

Every other module reads these names here: `validate` (the accepted `data.name` values and the
data/task check), `sources` (which task a dataset is), `tfds_io` and `build` (the builders),
`brats` (the releases its builder reads) and `workdir`. This module imports nothing, so `validate`
reads it without importing TFDS. The partition strategies are `partition.STRATEGIES`.
"""

# data.name -> the task (a key of tasks.TASKS) whose examples it holds
TASK_OF = {
    'synthetic_cxr': 'chestxray14',
    'nih_chestxray14': 'chestxray14',
    'synthetic_brats': 'brats',
    'brats2020': 'brats',
    'brats2021': 'brats',
    'msd_brain': 'brats',
}
DATASETS = tuple(TASK_OF)  # every data.name
# The synthetic twins: generated in memory, or built as TFDS datasets (synthetic_builders.py).
SYNTHETIC = ('synthetic_cxr', 'synthetic_brats')
# The real BraTS releases, all read by the one BraTS builder (brats.py) and its options.
BRATS_VERSIONS = ('brats2020', 'brats2021', 'msd_brain')
# The real datasets: TFDS builders made from a manual download.
REAL = ('nih_chestxray14', *BRATS_VERSIONS)
