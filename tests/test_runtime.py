"""Process settings made before TensorFlow is imported (runtime.py): oneDNN on x86 unless the user chose."""

import os
import pathlib
import platform
import re
import subprocess
import sys

import pytest

import runtime
from helpers import ROOT

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


def test_cpu_flags_are_read(monkeypatch):
  monkeypatch.delenv(runtime.BF16_ENV, raising=False)  # What the CPU has, not what the suite was told.
  flags = runtime.cpu_flags()
  if platform.machine().lower() in runtime.X86 and os.path.exists('/proc/cpuinfo'):
    assert 'sse2' in flags, flags
    assert runtime.cpu_has_bf16() == ('avx512_bf16' in flags or 'amx_bf16' in flags)
    assert ('(AVX-512' in runtime.describe_cpu()) == ('avx512f' in flags)


def test_dreamer_cpu_bf16_chooses_the_cpu_precision_as_another_kind_of_cpu(monkeypatch):
  import dreamer
  import flags
  config = dreamer.parse_args(['--precision', '16'])
  if dreamer.tf.config.list_physical_devices('GPU'):
    pytest.skip('on a GPU --precision 16 is mixed_float16 whatever the CPU has')
  for value, policy in (('1', 'mixed_bfloat16'), ('0', 'float32')):
    monkeypatch.setenv(runtime.BF16_ENV, value)
    assert runtime.cpu_has_bf16() == (value == '1')
    assert dreamer.resolve_precision(config) == policy
    assert dreamer.resolve_precision(dreamer.parse_args(['--precision', '32'])) == 'float32'
    assert f'{runtime.BF16_ENV}={value} set by you' in runtime.describe_cpu()
  monkeypatch.setenv(runtime.BF16_ENV, 'yes')
  with pytest.raises(flags.UserError, match=r"DREAMER_CPU_BF16='yes': use 1 .* 0 .* or leave it unset"):
    dreamer.resolve_precision(config)
  monkeypatch.delenv(runtime.BF16_ENV)
  assert runtime.cpu_has_bf16() == bool(runtime.cpu_flags() & {'avx512_bf16', 'amx_bf16'})


@pytest.mark.parametrize('flags, source', [
    ({'avx2', 'avx512f'}, 'set by this port; TensorFlow leaves it off on CPUs without AVX-512 VNNI/BF16'),
    ({'avx2', 'avx512f', 'avx512_vnni', 'avx512_bf16'}, "TensorFlow's default on this CPU"),
    ({'avx2', 'avx512f', 'avx512_bf16', 'amx_tile', 'amx_bf16'}, "TensorFlow's default on this CPU"),
])
def test_the_onednn_line_says_who_turned_it_on(monkeypatch, flags, source):
  monkeypatch.setattr(runtime, 'cpu_flags', lambda: flags)
  monkeypatch.setattr(runtime, 'onednn_source', 'port')
  monkeypatch.delenv(runtime.BF16_ENV, raising=False)
  described = runtime.describe_cpu()
  assert f'oneDNN on ({source}' in described or f'oneDNN off ({source}' in described, described
  assert ('AVX-512, AMX)' in described or 'BF16, AMX)' in described) == ('amx_tile' in flags), described


THREADS_PROBE = ('import sys, flags, dreamer, runtime; dreamer.setup(flags.parse_and_check(sys.argv[1:])); '
                 'import tensorflow as tf; tf.matmul(tf.ones([64, 64]), tf.ones([64, 64])).numpy(); '
                 'print(runtime.threads_per_op() or "default", "|", runtime.lanes(), '
                 'tf.config.threading.get_intra_op_parallelism_threads())')


def test_intra_op_threads_reach_tensorflow_before_it_starts(tmp_path):
  # The cpu preset runs each op single-threaded (two at a time on two cores); a flag given wins; 0 is TF's default.
  # The benchmark's kernel floor and peak then run as many kernels side by side as fill the cores.
  cores = len(os.sched_getaffinity(0))
  for argv, threads in ((['--preset', 'cpu'], 1), (['--preset', 'cpu', '--intra_op_threads', '3'], 3), ([], 0)):
    result = subprocess.run([sys.executable, '-c', THREADS_PROBE, '--logdir', str(tmp_path), *argv],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    lanes = max(1, cores // threads) if threads else 1
    said, _, numbers = result.stdout.strip().splitlines()[-1].partition(' | ')
    assert numbers.split() == [str(lanes), str(threads)], (argv, result.stdout)
    # What the run prints on its CPU line (and a campaign records as the run's machine).
    assert said == {0: 'default', 1: '1 thread per op'}.get(threads, f'{threads} threads per op'), said


AGENT_PROBE = ('import sys, flags, dreamer, gymnasium, tensorflow as tf; config = flags.parse_and_check(sys.argv[1:]); '
               'dreamer.setup(config); agent = dreamer.Dreamer(config, gymnasium.spaces.Box(-1, 1, (2,))); '
               'spec = tf.TensorSpec([config.batch_size, config.batch_length, 64, 64, 3]); '
               'graph = tf.function(lambda x: agent._encode({"image": x})).get_concrete_function(spec).graph; '
               'print(*[op.inputs[0].shape[0] for op in graph.get_operations() if op.type == "Conv2D"])')


def test_with_one_thread_per_op_the_agent_encodes_its_batch_in_lanes(tmp_path):
  # The debug preset's batch: 4 x 10 images; on two cores with one thread per op, two slices of 20.
  cores = len(os.sched_getaffinity(0))
  for argv, batches in ((['--intra_op_threads', '1'], [40 // cores] * 4 * cores), ([], [40] * 4)):
    result = subprocess.run([sys.executable, '-c', AGENT_PROBE, '--logdir', str(tmp_path), '--preset', 'debug', *argv],
                            capture_output=True, text=True, cwd=ROOT, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1].split() == [str(b) for b in batches], (argv, result.stdout)


def test_intra_op_threads_cannot_change_once_tensorflow_has_started():
  import dreamer
  import tensorflow as tf
  tf.constant(1.0).numpy()  # This process's TensorFlow has started.
  current = tf.config.threading.get_intra_op_parallelism_threads()
  dreamer.set_intra_op_threads(current)  # The setting it has: nothing to do.
  with pytest.raises(dreamer.UserError, match=rf'--intra_op_threads {current + 5}: TensorFlow has already started'):
    dreamer.set_intra_op_threads(current + 5)
  assert tf.config.threading.get_intra_op_parallelism_threads() == current


XLA_PROBE = ('import os, runtime; runtime.configure(); print(os.environ.get("TF_XLA_FLAGS"))')


def xla_flags_after_configure(**env):
  """TF_XLA_FLAGS as runtime.configure() leaves it in a fresh process started with `env` (None: unset), and what
  it printed on stderr."""
  environ = {k: v for k, v in os.environ.items()
             if k not in env and k not in ('TF_XLA_FLAGS', 'XLA_FLAGS', runtime.XLA_CACHE_ENV)}
  environ.update({k: v for k, v in env.items() if v is not None})
  result = subprocess.run([sys.executable, '-c', XLA_PROBE], capture_output=True, text=True, cwd=ROOT,
                          env=environ, timeout=60)
  assert result.returncode == 0, result.stderr
  return result.stdout.strip(), result.stderr


def test_the_xla_cache_is_opt_in_kept_per_tensorflow_version_cpu_and_xla_flags_and_yields_to_the_user(tmp_path):
  from importlib import metadata
  flag, cpu_only = '--' + runtime.XLA_CACHE_FLAG, '--tf_xla_persistent_cache_device_types=CPU'
  assert xla_flags_after_configure(XDG_CACHE_HOME=str(tmp_path / 'cache')) == ('None', '')  # Off by default.
  assert xla_flags_after_configure(DREAMER_XLA_CACHE='0')[0] == 'None'
  on, _ = xla_flags_after_configure(DREAMER_XLA_CACHE='1', XDG_CACHE_HOME=str(tmp_path / 'cache'))
  version, machine = metadata.version('tensorflow'), platform.machine()
  subdir = f'tf{re.escape(version)}-{machine}-[0-9a-f]{{12}}'
  assert re.fullmatch(f'{flag}={tmp_path}/cache/dreamer/xla/{subdir} {cpu_only}', on), on
  assert pathlib.Path(on.split()[0].partition('=')[2]).is_dir()
  # The same CPU, version and XLA_FLAGS give the same directory; other XLA_FLAGS another one.
  assert xla_flags_after_configure(DREAMER_XLA_CACHE='1', XDG_CACHE_HOME=str(tmp_path / 'cache'))[0] == on
  other, _ = xla_flags_after_configure(DREAMER_XLA_CACHE='1', XDG_CACHE_HOME=str(tmp_path / 'cache'),
                                       XLA_FLAGS='--xla_cpu_enable_fast_math=true')
  assert other != on and other.startswith(f'{flag}={tmp_path}/cache/dreamer/xla/tf'), other
  mine, _ = xla_flags_after_configure(DREAMER_XLA_CACHE=str(tmp_path / 'mine'))
  assert re.fullmatch(f'{flag}={tmp_path}/mine/{subdir} {cpu_only}', mine), mine
  # The user's other XLA flags stay; a cache directory of theirs wins.
  kept, _ = xla_flags_after_configure(TF_XLA_FLAGS='--tf_xla_clustering_debug', DREAMER_XLA_CACHE=str(tmp_path / 'x'))
  assert kept.startswith(f'--tf_xla_clustering_debug {flag}={tmp_path}/x/tf'), kept
  theirs = f'{flag}={tmp_path}/theirs --tf_xla_clustering_debug'
  assert xla_flags_after_configure(TF_XLA_FLAGS=theirs, DREAMER_XLA_CACHE='1')[0] == theirs
  # Where it cannot work it stays off and says why.
  off, said = xla_flags_after_configure(DREAMER_XLA_CACHE=str(tmp_path / 'with space'))
  assert off == 'None' and 'XLA cache stays off' in said and 'whitespace' in said, said
  (tmp_path / 'file').write_text('')
  off, said = xla_flags_after_configure(DREAMER_XLA_CACHE=str(tmp_path / 'file'))
  assert off == 'None' and 'cannot be made' in said, said


CACHE_PROBE = ('import runtime; runtime.configure(); import tensorflow as tf, models; '
               'x = tf.cast(tf.range(-2.0 ** 17, 2.0 ** 17) / 1000, tf.bfloat16)\n'
               'with tf.GradientTape() as tape:\n'
               '  tape.watch(x); y = models.get_act("elu")(x)\n'
               'print(float(tf.reduce_sum(tf.cast(tape.gradient(y, x), tf.float32))))')


def test_a_second_process_loads_the_xla_programs_the_first_compiled(tmp_path):
  # The bfloat16 elu gradient at 2^18 elements is one of the port's XLA programs (models.get_act). TensorFlow's
  # own log says whether a process compiled and saved it or loaded it.
  env = dict(os.environ, DREAMER_XLA_CACHE=str(tmp_path), TF_CPP_MIN_LOG_LEVEL='0',
             TF_CPP_VMODULE='device_executable_persistor=1')
  env.pop('XLA_FLAGS', None)
  env.pop('TF_XLA_FLAGS', None)
  runs = []
  for _ in range(2):
    result = subprocess.run([sys.executable, '-c', CACHE_PROBE], capture_output=True, text=True, cwd=ROOT, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    entries = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in tmp_path.glob('*/*.pb')}
    runs.append((result.stdout.split()[-1], result.stderr, entries))
  (value, log, entries), (value2, log2, entries2) = runs
  assert entries and 'Serializing and saving cache entry' in log and 'Loading cached entry' not in log, log[-3000:]
  assert 'Loading cached entry' in log2 and 'Serializing and saving cache entry' not in log2, log2[-3000:]
  assert entries2 == entries  # Loaded, not written again.
  assert value2 == value


WARNING_PROBE = ('import runtime; runtime.configure(); import dreamer; '
                 'print(dreamer.precision_warning("mixed_bfloat16", "CPU"), "|", '
                 'dreamer.precision_warning("float32", "CPU"), "|", dreamer.precision_warning("mixed_bfloat16", "GPU"))')


def test_bfloat16_on_tensorflows_own_cpu_kernels_is_warned_about():
  # With oneDNN off TensorFlow's own bfloat16 convolution filter gradients sum in bfloat16 (3% off against float32
  # at [400, 30, 30, 32] -> 64 channels, 0.4% with oneDNN); a run says so and what to do.
  for onednn in ('0', '1'):
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS=onednn)
    result = subprocess.run([sys.executable, '-c', WARNING_PROBE], capture_output=True, text=True, cwd=ROOT,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    bf16, f32, gpu = result.stdout.strip().splitlines()[-1].split(' | ')
    assert f32 == 'None' and gpu == 'None', result.stdout
    takes = onednn == '1' and bool(runtime.cpu_flags() & {'avx512f', 'avx_ne_convert'})
    if takes:
      assert bf16 == 'None', bf16
    else:
      assert bf16.startswith('Warning: --precision 16 runs as mixed_bfloat16') and 'TF_ENABLE_ONEDNN_OPTS' in bf16, bf16
      assert ('oneDNN is off' in bf16) == (onednn == '0'), bf16
