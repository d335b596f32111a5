"""Process settings made before TensorFlow is imported (runtime.py): oneDNN on x86 unless the user chose."""

import os
import platform
import subprocess
import sys

import runtime
from conftest import ROOT

PROBE = ('import os, runtime; runtime.configure(); '
         'print(os.environ.get("TF_ENABLE_ONEDNN_OPTS"), runtime.onednn_source, os.environ["MUJOCO_GL"])')


def configured(**env):
  """What runtime.configure() leaves in a fresh process started with `env` (None: unset)."""
  environ = {k: v for k, v in os.environ.items() if k not in env and k not in ('TF_ENABLE_ONEDNN_OPTS', 'MUJOCO_GL')}
  environ.update({k: v for k, v in env.items() if v is not None})
  result = subprocess.run([sys.executable, '-c', PROBE], capture_output=True, text=True, cwd=ROOT, env=environ,
                          timeout=60)
  assert result.returncode == 0, result.stderr
  return result.stdout.split()


def test_onednn_is_turned_on_on_x86_unless_the_user_chose():
  if platform.machine().lower() in runtime.X86:
    assert configured() == ['1', 'port', 'egl']
  else:
    assert configured() == ['None', 'None', 'egl']
  assert configured(TF_ENABLE_ONEDNN_OPTS='0') == ['0', 'user', 'egl']
  assert configured(TF_ENABLE_ONEDNN_OPTS='1', MUJOCO_GL='osmesa') == ['1', 'user', 'osmesa']


def test_tensorflow_runs_with_the_chosen_setting():
  # The test process was configured by conftest.py like every entry point.
  expected = os.environ.get('TF_ENABLE_ONEDNN_OPTS') == '1'
  assert runtime.onednn_enabled() is expected
  described = runtime.describe_cpu()
  assert f"oneDNN {'on' if expected else 'off'}" in described, described


def test_cpu_flags_are_read():
  flags = runtime.cpu_flags()
  if platform.machine().lower() in runtime.X86 and os.path.exists('/proc/cpuinfo'):
    assert 'sse2' in flags, flags
    assert runtime.cpu_has_bf16() == ('avx512_bf16' in flags or 'amx_bf16' in flags)
    assert ('(AVX-512' in runtime.describe_cpu()) == ('avx512f' in flags)
