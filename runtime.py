"""Process settings that must be made before TensorFlow is imported, and what this CPU has. No TensorFlow here.

`configure()` is called first thing by every entry point (dreamer.py, compare.py, the tests' conftest.py):
- TF_CPP_MIN_LOG_LEVEL=3: TensorFlow's C++ logging (CUDA probing on machines without a GPU) is silenced.
- MUJOCO_GL=egl: headless rendering (osmesa's library is missing on the machines this was made on).
- TF_ENABLE_ONEDNN_OPTS=1 on x86: TensorFlow 2.21 turns its oneDNN kernels on by default only on CPUs with
  AVX-512 (VNNI/BF16) or AMX; on an AVX2 CPU it leaves them off, and the paper's train step then takes twice as
  long (14.0 s against 7.3 s on 2 cores of an AMD EPYC with AVX2, docs/speed.md). Where TensorFlow turns them on
  itself this changes nothing. oneDNN sums in another order: results move by float rounding only (the original
  code's own outputs moved by at most 4e-7 relative between the two settings).
Each default yields to a value the user set in the environment.

- DREAMER_XLA_CACHE=1 (or a directory) turns TensorFlow's persistent XLA cache on (xla_cache_dir): the XLA
  programs a process compiles (the bfloat16 activations' gradients and the GRU's gates in models.py, the policy
  step) are written to disk and loaded by later processes instead of compiled again, about 0.5 s of the paper-size
  first train step on the AMX machine (docs/speed.md, session 14). Off by default: TensorFlow fails the op, rather
  than compiling again, when it cannot write an entry (a full disk, a quota) or read one (a damaged file). A
  TF_XLA_FLAGS that already names a cache directory is left alone.

DREAMER_CPU_BF16=1 (or 0) makes `--precision 16` on a CPU resolve as on a CPU with (or without) bfloat16
instructions, whatever this one has: mixed_bfloat16 (TensorFlow emulates it where the CPU lacks it: slow, but the
same rounding) or float32. The tests honour it, so that the suite runs as each kind of CPU would run it.
"""

import hashlib
import os
import pathlib
import platform
import shutil

X86 = ('x86_64', 'amd64', 'i386', 'i686')

# Where TF_ENABLE_ONEDNN_OPTS came from: 'user' (set before we ran), 'port' (set by configure), None (unset).
onednn_source = None


def configure():
  global onednn_source
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  os.environ.setdefault('MUJOCO_GL', 'egl')
  if onednn_source is None:
    if 'TF_ENABLE_ONEDNN_OPTS' in os.environ:
      onednn_source = 'user'
    elif platform.machine().lower() in X86:
      os.environ['TF_ENABLE_ONEDNN_OPTS'] = '1'
      onednn_source = 'port'
  xla_flags = os.environ.get('TF_XLA_FLAGS', '')
  if XLA_CACHE_FLAG not in xla_flags:
    cache = xla_cache_dir()
    if cache:
      os.environ['TF_XLA_FLAGS'] = (f'{xla_flags} --{XLA_CACHE_FLAG}={cache} '
                                    f'--tf_xla_persistent_cache_device_types=CPU').strip()


XLA_CACHE_ENV = 'DREAMER_XLA_CACHE'
XLA_CACHE_FLAG = 'tf_xla_persistent_cache_directory'
XLA_CACHE_MIN_FREE = 2 ** 30  # Bytes free on the cache's file system, or the cache stays off.


def xla_cache_dir():
  """The directory of TensorFlow's persistent XLA cache for this process, or None: DREAMER_XLA_CACHE unset or 0
  (off), 1 (under ~/.cache/dreamer/xla, or XDG_CACHE_HOME) or a directory, in a subdirectory per TensorFlow
  version, CPU and XLA_FLAGS: an entry holds machine code for this CPU's instructions, built with those flags, and
  TensorFlow's key covers neither (it would load another CPU's entry from a shared home directory, or one built
  with other XLA_FLAGS). Off, with a line on stderr, where the directory cannot be written, has less than
  XLA_CACHE_MIN_FREE bytes free, or has whitespace in its path (TF_XLA_FLAGS splits at whitespace). Only the CPU's
  XLA programs are cached. Entries are written to a temporary file and renamed, so concurrent runs and a crash leave
  no partial entry. No TensorFlow import."""
  chosen = os.environ.get(XLA_CACHE_ENV, '0')
  if chosen in ('0', ''):
    return None
  base = (pathlib.Path(os.environ.get('XDG_CACHE_HOME') or pathlib.Path.home() / '.cache') / 'dreamer' / 'xla'
          if chosen == '1' else pathlib.Path(chosen).expanduser())
  try:
    from importlib import metadata
    version = metadata.version('tensorflow')
  except Exception:  # No installed distribution to name: no cache rather than one shared across versions.
    return _no_xla_cache(base, 'the installed TensorFlow has no version to key it by')
  key = f'{cpu_model()} {sorted(cpu_flags())} {os.environ.get("XLA_FLAGS", "")}'
  path = base / f'tf{version}-{platform.machine()}-{hashlib.sha256(key.encode()).hexdigest()[:12]}'
  if any(c.isspace() for c in str(path)):
    return _no_xla_cache(path, 'its path has whitespace, which TF_XLA_FLAGS cannot hold')
  try:
    path.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path).free
  except OSError as e:
    return _no_xla_cache(path, f'it cannot be made ({e.strerror})')
  if not os.access(path, os.W_OK):
    return _no_xla_cache(path, 'it is not writable')
  if free < XLA_CACHE_MIN_FREE:
    return _no_xla_cache(path, f'its file system has {free / 2 ** 20:.0f} MiB free, less than 1 GiB')
  return str(path)


def _no_xla_cache(path, why):
  import sys
  print(f'{XLA_CACHE_ENV}: the XLA cache stays off: {path}: {why}.', file=sys.stderr)
  return None


def import_tensorflow():
  """Imports TensorFlow with the process's stderr (fd 2) held back: its C++ start-up lines (absl's "All log
  messages before absl::InitializeLog()", CUDA stub probing on machines without a GPU) ignore
  TF_CPP_MIN_LOG_LEVEL. What was held back is printed if the import fails, or when the user set
  TF_CPP_MIN_LOG_LEVEL below 3 to see such lines."""
  import sys
  import tempfile
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as held:
    os.dup2(held.fileno(), 2)
    try:
      import tensorflow as tf
      failed = False
    except BaseException:
      failed = True
      raise
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      if failed or os.environ.get('TF_CPP_MIN_LOG_LEVEL') != '3':
        held.seek(0)
        sys.stderr.write(held.read().decode(errors='replace'))
  return tf


def _cpuinfo():
  try:
    return pathlib.Path('/proc/cpuinfo').read_text()
  except OSError:
    return ''


def cpu_flags():
  """The instruction-set flags of the first CPU (empty where /proc/cpuinfo is missing)."""
  for line in _cpuinfo().splitlines():
    if line.startswith('flags'):
      return set(line.partition(':')[2].split())
  return set()


def cpu_model():
  for line in _cpuinfo().splitlines():
    if line.startswith('model name'):
      return line.partition(':')[2].strip()
  return platform.processor() or platform.machine()


# The instructions with which TensorFlow 2.21 turns its oneDNN kernels on by itself (tensorflow/core/util/util.cc,
# IsMKLEnabled: AVX-512 VNNI or BF16, AVX-VNNI, or AMX).
ONEDNN_BY_DEFAULT = {'avx512_vnni', 'avx512_bf16', 'avx_vnni', 'amx_tile', 'amx_int8', 'amx_bf16'}
BF16_ENV = 'DREAMER_CPU_BF16'


def cpu_has_bf16():
  """Whether `--precision 16` on this CPU runs mixed_bfloat16: the CPU's bfloat16 instructions (AVX512-BF16 or
  AMX), unless DREAMER_CPU_BF16 is 1 or 0."""
  forced = os.environ.get(BF16_ENV)
  if forced in ('0', '1'):
    return forced == '1'
  if forced:
    raise ValueError(f'{BF16_ENV}={forced!r}: use 1 (run --precision 16 as a bfloat16 CPU does), 0 (as a CPU '
                     'without bfloat16 does) or leave it unset.')
  return bool(cpu_flags() & {'avx512_bf16', 'amx_bf16'})


def onednn_enabled():
  """Whether TensorFlow runs its oneDNN kernels in this process (None when it cannot tell). Imports TF."""
  try:
    from tensorflow.python.util import _pywrap_util_port
    return bool(_pywrap_util_port.IsMklEnabled())
  except (ImportError, AttributeError):
    return None


def onednn_takes_bfloat16():
  """Whether TensorFlow runs its bfloat16 convolutions and matmuls with oneDNN here: oneDNN on, and a CPU it takes
  bfloat16 on (TensorFlow 2.21: AVX-512 or AVX-NE-CONVERT, util/util.cc). Elsewhere TensorFlow's own bfloat16
  kernels run, whose convolution filter gradients sum in bfloat16 (3% off against float32 where oneDNN's are 0.4%,
  docs/speed.md, session 14). Imports TF."""
  return bool(onednn_enabled()) and bool(cpu_flags() & {'avx512f', 'avx_ne_convert'})


def threads_per_op():
  """E.g. '1 thread per op' when --intra_op_threads set TensorFlow's intra-op threads; '' for its default (all
  cores). Imports TF."""
  import tensorflow as tf
  threads = tf.config.threading.get_intra_op_parallelism_threads()
  return f'{threads} thread{"s" * (threads != 1)} per op' if threads else ''


def lanes():
  """How many ops fill the CPU's cores: 1 (TensorFlow's default: each op on all cores; or a GPU computes), or cores
  / threads per op under --intra_op_threads (then that many run side by side). Imports TF."""
  import tensorflow as tf
  threads = tf.config.threading.get_intra_op_parallelism_threads()
  if not threads or tf.config.list_physical_devices('GPU'):
    return 1
  return max(1, cores() // threads)


def cores():
  """The cores this process may run on."""
  return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()


def describe_cpu():
  """E.g. 'AMD EPYC (AVX2, no AVX-512), oneDNN on (set by this port; TensorFlow leaves it off on CPUs without ...)'."""
  flags = cpu_flags()
  isa = 'AVX-512' + (' with BF16' if 'avx512_bf16' in flags else '') if 'avx512f' in flags else (
      'AVX2, no AVX-512' if 'avx2' in flags else 'no AVX2')
  if flags & {'amx_tile', 'amx_bf16'}:
    isa += ', AMX'
  state = {True: 'on', False: 'off', None: 'unknown'}[onednn_enabled()]
  port = ("TensorFlow's default on this CPU" if flags & ONEDNN_BY_DEFAULT else
          'set by this port; TensorFlow leaves it off on CPUs without AVX-512 VNNI/BF16, AVX-VNNI or AMX')
  source = {
      'user': f'TF_ENABLE_ONEDNN_OPTS={os.environ.get("TF_ENABLE_ONEDNN_OPTS")} set by you',
      'port': port,
      None: "TensorFlow's default"}[onednn_source]
  text = f'{cpu_model()} ({isa}), oneDNN {state} ({source})'
  if os.environ.get(BF16_ENV) in ('0', '1'):
    text += f'; {BF16_ENV}={os.environ[BF16_ENV]} set by you'
  return text
