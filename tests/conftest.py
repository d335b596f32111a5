"""Test setup: the settings users run with (made before TensorFlow is imported), the `e2e` marker, the test order
and the dtype-policy fixture. The shared helpers are in helpers.py.

Tests marked `e2e` run the command (`python dreamer.py ...`, in a process of its own or, through `run_cli`, in the
test's) on real environments, or many real train steps; `pytest -m "not e2e"` runs the fast part alone."""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # The modules under test; pytest puts tests/ itself (helpers.py) on the path.
  sys.path.insert(0, str(ROOT))

import runtime  # noqa: E402

runtime.configure()  # Before TensorFlow is imported anywhere: the settings users run with (runtime.py).
# As dreamer.py imports it: TensorFlow's C++ start-up lines held back (they would otherwise show after pytest's
# summary, written by every test process).
runtime.import_tensorflow()

import keras  # noqa: E402
import pytest  # noqa: E402


def pytest_configure(config):
  config.addinivalue_line('markers', 'e2e: end to end: the real command on real environments, or many real '
                          'train steps (slow)')


def pytest_collection_modifyitems(items):
  """The slow (e2e) tests first, the longest of them (`e2e(longest=True)`: minutes, in one process after another)
  before the rest, so that the workers (pytest.ini) do not end on one long test each; a module's tests that share
  an expensive module fixture carry an `xdist_group` mark and run on one worker."""
  def order(item):
    e2e = item.get_closest_marker('e2e')
    return (e2e is None, not (e2e and e2e.kwargs.get('longest')))
  items.sort(key=order)  # Stable: file order within each part.


# The fixture's 16 is bfloat16 on every CPU (TensorFlow emulates it where the CPU lacks it): no loss scaling,
# unlike float16.
POLICIES = {16: 'mixed_bfloat16', 32: 'float32'}


@pytest.fixture(params=sorted(POLICIES), ids=lambda p: f'precision{p}')
def precision(request):
  """Sets the global Keras dtype policy for one test and restores float32 afterwards; yields 16 or 32."""
  keras.mixed_precision.set_global_policy(POLICIES[request.param])
  try:
    yield request.param
  finally:
    keras.mixed_precision.set_global_policy('float32')
