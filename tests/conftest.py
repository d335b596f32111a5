"""Shared test setup and helpers: import path, the settings users run with, the dtype-policy fixture, the tiny
config, the command runners, synthetic episodes and the reference's files in tests/data.

Tests marked `e2e` run the command (`python dreamer.py ...`, in a process of its own or, through `run_cli`, in the
test's) on real environments, or many real train steps; `pytest -m "not e2e"` runs the fast part alone."""

import contextlib
import io
import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
DATA = ROOT / 'tests' / 'data'  # Copies of the reference's files; tests read nothing outside the repo.
WALKER = DATA / 'reference' / 'walker_default'
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

import runtime  # noqa: E402

runtime.configure()  # Before TensorFlow is imported anywhere: the settings users run with (runtime.py).
# As dreamer.py imports it: TensorFlow's C++ start-up lines held back (they would otherwise show after pytest's
# summary, written by every test process).
runtime.import_tensorflow()

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# The tiny configuration of the tests (the debug preset: 100-step walker episodes, batches of 4 x 10) in float32.
TINY = ['--task', 'dmc_walker_walk', '--preset', 'debug', '--precision', '32']


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


def run_dreamer(*args, timeout=600):
  """`python dreamer.py ARGS` in a subprocess; the CompletedProcess with its text output."""
  return subprocess.run([sys.executable, str(ROOT / 'dreamer.py'), *args], capture_output=True, text=True,
                        timeout=timeout)


def run_cli(*args):
  """`python dreamer.py ARGS` in this process, as the command runs it (parse, check, main; errors become exit
  codes): (exit code, stdout, stderr). No process start and no second TensorFlow import: for runs that stop before
  training and for whole tiny runs alike (also from module fixtures: the output is captured here, not by pytest)."""
  import dreamer
  import flags
  out, err = io.StringIO(), io.StringIO()
  try:
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      dreamer.cli(flags.parse_and_check(list(args)))
    code = 0
  except SystemExit as e:
    code = e.code
  except BaseException:  # A crash: show what the run printed with the traceback.
    sys.stdout.write(out.getvalue())
    sys.stderr.write(err.getvalue())
    raise
  finally:
    keras.mixed_precision.set_global_policy('float32')
  return code, out.getvalue(), err.getvalue()


def start_dreamer(*args):
  """`python dreamer.py ARGS` running in the background, stdout and stderr merged into `stdout` (text lines)."""
  env = dict(os.environ, PYTHONUNBUFFERED='1')  # Each line as it is printed: tests act on what the run says.
  return subprocess.Popen([sys.executable, str(ROOT / 'dreamer.py'), *args], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=env)


def fake_episodes(directory, count, length=21, seed=0):
  """`count` random walker-shaped episodes of `length` steps saved in `directory` (images, 6-D actions)."""
  import tools
  rng = np.random.RandomState(seed)
  for _ in range(count):
    tools.save_episodes(directory, [dict(
        image=rng.randint(0, 255, (length, 64, 64, 3), dtype=np.uint8),
        action=rng.uniform(-1, 1, (length, 6)).astype(np.float32),
        reward=rng.rand(length).astype(np.float32), discount=np.ones(length, np.float32))])

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


def read_order(name):
  """Rows (index, name, shape, dtype) of tests/data/variables_order.{name}.txt, the reference agent's variable
  table. The owner column (`_actor/h0(Dense)/kernel`, `_metrics['div'](Mean)/total`) is turned into the port's
  checkpoint names (`_actor/h0/kernel`, `_metrics/div/total`): class names dropped, dict keys as path parts."""
  rows = []
  for line in (DATA / f'variables_order.{name}.txt').read_text().splitlines():
    if line.startswith('#') or '|' not in line:
      continue
    index, _, shape, dtype, owner = [c.strip() for c in line.split('|')[:5]]
    owner = re.sub(r"\['(\w+)'\]", r'/\1', re.sub(r'\(\w+\)', '', owner))
    rows.append((int(index), owner, tuple(int(x) for x in re.findall(r'\d+', shape)), dtype))
  assert [row[0] for row in rows] == list(range(len(rows))), f'variables_order.{name}.txt: indices not 0..n-1'
  return rows


def build_agent(argv, actspace):
  """A Dreamer agent from flags, in float32 and seeded by --seed, built without a replay: no environment, no
  train step."""
  import dreamer  # Imported on use: conftest is loaded by every test file, also the ones that need no agent.
  config = dreamer.parse_args(['--precision', '32', *argv])
  keras.mixed_precision.set_global_policy('float32')
  keras.utils.set_random_seed(config.seed)
  return dreamer.Dreamer(config, actspace)


def resolve(agent, name):
  """The variable a checkpoint name denotes, looked up on the agent: `_step`, `_metrics/<metric>/<total|count>`,
  or `_<module>/<layer>/<weight>` with the layer an attribute of the module or a Keras sublayer of that name."""
  parts = name.split('/')
  if parts[0] == '_metrics':
    return getattr(agent._metrics[parts[1]], parts[2])
  obj = agent
  for part in parts[:-1]:
    sub = getattr(obj, part, None)
    obj = sub if sub is not None else {l.name: l for l in obj._flatten_layers(include_self=False)}[part]
  return getattr(obj, parts[-1])
