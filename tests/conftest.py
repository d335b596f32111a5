"""Shared test setup: import path, quiet TF, and the dtype-policy fixture."""

import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

import runtime  # noqa: E402

runtime.configure()  # Before TensorFlow is imported anywhere: the settings users run with (runtime.py).

import keras  # noqa: E402
import pytest  # noqa: E402

# 16 uses bfloat16: it runs on this CPU and needs no loss scaling, unlike float16.
POLICIES = {16: 'mixed_bfloat16', 32: 'float32'}


@pytest.fixture(params=sorted(POLICIES), ids=lambda p: f'precision{p}')
def precision(request):
  """Sets the global Keras dtype policy for one test and restores float32 afterwards; yields 16 or 32."""
  keras.mixed_precision.set_global_policy(POLICIES[request.param])
  try:
    yield request.param
  finally:
    keras.mixed_precision.set_global_policy('float32')
