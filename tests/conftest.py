"""Test set-up: CPU only, a persistent compilation cache shared by the test processes (several
tests compile the same smoke round), and helpers for tiny configs."""

import os
import sys
import tempfile

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault(
    'JAX_COMPILATION_CACHE_DIR', os.path.join(tempfile.gettempdir(), 'fedjax_med_test_jax_cache')
)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path[:1] != [REPO]:  # first, ahead of any installed package named `configs`
    sys.path.insert(0, REPO)  # `configs` is a folder of the repository, not installed
