"""Distributed training: MirroredStrategy over two logical CPUs and MultiWorkerMirroredStrategy with two worker
processes on loopback make the same updates as one device (same global batch, same seeds)."""

import json
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import benchmark  # noqa: E402
from test_dreamer import TINY, run  # noqa: E402

FLAGS = ['--preset', 'debug', '--precision', '32', '--batch_size', '4', '--batch_length', '10']
SCRIPT = ROOT / 'tests' / 'distribute_run.py'


def launch(out, init, episodes, *flags, env=None):
  return subprocess.Popen([sys.executable, str(SCRIPT), str(out), str(init), str(episodes), *FLAGS, *flags],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def finish(process, timeout=600):
  output, _ = process.communicate(timeout=timeout)
  assert process.returncode == 0, output[-3000:]
  return output


@pytest.fixture(scope='module')
def one_device(tmp_path_factory):
  """Initial weights (saved by the one-device run) and the one-device result after three train steps."""
  directory = tmp_path_factory.mktemp('distribute')
  episodes = directory / 'episodes'
  benchmark.synthetic_episodes(episodes, benchmark_config(), 6)
  finish(launch(directory / 'one.npz', directory / 'init.pkl', episodes))
  return directory, np.load(directory / 'one.npz')


def benchmark_config():
  import dreamer
  return dreamer.parse_args(['--logdir', '.'] + FLAGS)


def assert_same_updates(one, other):
  assert int(other['replicas']) == 2
  names = list(one['names'])
  assert names == list(other['names'])
  for index, name in enumerate(names):
    a, b = one[f'w{index}'], other[f'w{index}']
    if name == '_metrics/action_ent/total':  # A Monte-Carlo estimate that each replica samples for itself.
      np.testing.assert_allclose(a, b, rtol=0.05)
      continue
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=name)
  # The weights moved: the comparison is not between untouched initial values.
  init_moved = [np.abs(one[f'w{i}']).sum() for i, n in enumerate(names) if n.startswith('_encode')]
  assert all(np.isfinite(init_moved))
  metric_names = list(one['metric_names'])
  for column, name in enumerate(metric_names):
    if name != 'action_ent':
      np.testing.assert_allclose(one['metrics'][:, column], other['metrics'][:, column], rtol=1e-4, atol=1e-6,
                                 err_msg=name)


def test_weights_change_over_the_three_steps(one_device):
  directory, one = one_device
  import tools
  initial = tools.read_checkpoint(directory / 'init.pkl')
  names = list(one['names'])
  changed = [n for i, n in enumerate(names) if n.startswith(('_encode', '_actor', '_value'))
             and not np.allclose(initial[i], one[f'w{i}'])]
  assert any(n.startswith('_encode') for n in changed) and any(n.startswith('_actor') for n in changed)
  assert any(n.startswith('_value') for n in changed)


def test_mirrored_over_two_cpus_matches_one_device(one_device):
  directory, one = one_device
  output = finish(launch(directory / 'mirrored.npz', directory / 'init.pkl', directory / 'episodes',
                         '--distribute', 'mirrored', '--cpu_devices', '2'))
  assert '2 replicas' in output
  assert_same_updates(one, np.load(directory / 'mirrored.npz'))


def free_ports(count):
  sockets = [socket.socket() for _ in range(count)]
  for s in sockets:
    s.bind(('127.0.0.1', 0))
  ports = [s.getsockname()[1] for s in sockets]
  for s in sockets:
    s.close()
  return ports


def test_multi_worker_on_loopback_matches_one_device(one_device):
  directory, one = one_device
  import os
  workers = [f'127.0.0.1:{port}' for port in free_ports(2)]
  processes = []
  for index in range(2):
    env = dict(os.environ, TF_CONFIG=json.dumps(
        {'cluster': {'worker': workers}, 'task': {'type': 'worker', 'index': index}}))
    processes.append(launch(directory / f'worker{index}.npz', directory / 'init.pkl', directory / 'episodes',
                            env=env))
  try:
    for process in processes:
      finish(process)
  finally:
    for process in processes:
      process.kill()
  for index in range(2):  # Every worker holds the same, one-device weights.
    assert_same_updates(one, np.load(directory / f'worker{index}.npz'))


def test_training_run_with_mirrored_strategy(tmp_path):
  """The whole loop (prefill, distributed dataset, train, evaluation, checkpoint) under two replicas."""
  logdir = tmp_path / 'mirrored'
  result = run('--logdir', str(logdir), '--steps', '400', *TINY, '--distribute', 'mirrored', '--cpu_devices', '2')
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert 'MirroredStrategy with 2 replicas; each trains on 2 of the 4 sequences' in result.stdout
  assert (logdir / 'variables.pkl').exists()
  lines = [json.loads(line) for line in (logdir / 'metrics.jsonl').read_text().splitlines()]
  trained = [line for line in lines if 'model_loss' in line]
  assert trained and all(np.isfinite(line['model_loss']) for line in trained)


def test_batch_that_does_not_split_over_replicas_exits_2(tmp_path):
  result = run('--logdir', str(tmp_path / 'x'), *TINY, '--distribute', 'mirrored', '--cpu_devices', '3')
  assert result.returncode == 2
  assert '--batch_size 4 does not split evenly over the 3 replicas' in result.stderr
  assert 'use a multiple of 3' in result.stderr


def test_multi_worker_without_tf_config_exits_2(tmp_path):
  import os
  env = {k: v for k, v in os.environ.items() if k != 'TF_CONFIG'}
  result = subprocess.run([sys.executable, str(ROOT / 'dreamer.py'), '--logdir', str(tmp_path / 'x'), *TINY,
                           '--distribute', 'multi_worker'], capture_output=True, text=True, timeout=300, env=env)
  assert result.returncode == 2
  assert 'TF_CONFIG' in result.stderr
