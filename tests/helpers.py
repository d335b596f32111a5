"""Shared test helpers (test files import them: `from helpers import ...`): the repo's paths and the reference's
files in tests/data, the tiny configurations, the command runners, synthetic episodes, a tiny real agent, and the
reference's variable table. Fixtures, markers and the test order are conftest.py's."""

import contextlib
import io
import os
import pathlib
import re
import subprocess
import sys

import keras
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
DATA = ROOT / 'tests' / 'data'  # Copies of the reference's files; tests read nothing outside the repo.
WALKER = DATA / 'reference' / 'walker_default'

# The tiny configuration of the tests (the debug preset: 100-step walker episodes, batches of 4 x 10) in float32.
TINY = ['--task', 'dmc_walker_walk', '--preset', 'debug', '--precision', '32']


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


# A smaller agent still, for tests that make train steps in the test process: batches of 2 x 8, horizon 3.
TINY_AGENT = ['--precision', '32', '--batch_size', '2', '--batch_length', '8', '--deter_size', '16', '--stoch_size',
              '4', '--num_units', '16', '--cnn_depth', '2', '--horizon', '3']


def tiny_agent(logdir, *argv, datadir=None, precision=None):
  """(agent, dataset, config): a real walker agent of TINY_AGENT's size with `argv` on top, set up as main does
  (seeds), and the loop's dataset over the episodes in `datadir` (default `logdir`/episodes; three fake ones when
  it has none). `precision`: a dtype policy name for the agent instead of what --precision resolves to."""
  import dreamer
  import tensorflow as tf
  from gymnasium import spaces
  datadir = pathlib.Path(datadir or pathlib.Path(logdir) / 'episodes')
  if not list(datadir.glob('*.npz')):
    fake_episodes(datadir, 3)
  config = dreamer.parse_args(['--logdir', str(logdir), *TINY_AGENT, *argv])
  dreamer.setup(config)
  agent = dreamer.Dreamer(config, spaces.Box(-1, 1, (6,)), precision=precision)
  return agent, dreamer.make_dataset(datadir, config, tf.distribute.get_strategy()), config


def optimized_graphs(run):
  """The graphs TensorFlow ran while `run()` ran, each with its graph before and after grappler
  (`pre_optimization_graph`, `post_optimization_graph`), from run metadata. It also collects what other threads
  ran meanwhile (an earlier test's input pipeline): callers pick theirs."""
  from tensorflow.python.eager import context
  context.enable_run_metadata()
  try:
    run()
    return context.export_run_metadata().function_graphs
  finally:
    context.disable_run_metadata()
