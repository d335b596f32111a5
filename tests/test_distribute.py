"""Distributed training: MirroredStrategy over two logical CPUs and MultiWorkerMirroredStrategy with two worker
processes on loopback make the same updates as one device (same global batch, same seeds)."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest


import benchmark
import compare
import flags
from helpers import ROOT, TINY, run_cli, run_dreamer as run

pytestmark = pytest.mark.e2e  # Real train steps by the dozen, in several processes: slow.

FLAGS = ['--preset', 'debug', '--precision', '32', '--batch_size', '4', '--batch_length', '10']
SCRIPT = ROOT / 'tests' / 'distribute_run.py'


def launch(out, init, episodes, *flags, env=None):
  return subprocess.Popen([sys.executable, str(SCRIPT), str(out), str(init), str(episodes), *FLAGS, *flags],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def finish(process, timeout=600):
  output, _ = process.communicate(timeout=timeout)
  assert process.returncode == 0, output[-3000:]
  return output


def with_env(**extra):
  return dict(os.environ, **extra)


@pytest.fixture(scope='module')
def episodes(tmp_path_factory):
  import dreamer
  directory = tmp_path_factory.mktemp('episodes')
  benchmark.synthetic_episodes(directory, dreamer.parse_args(['--logdir', '.'] + FLAGS), 6)
  return directory


def launch_runs(directory, episodes, runs, *flags, env=None):
  """One process, several runs of the same three steps from the same initial weights (init.pkl, saved by the first
  when missing); `runs` names them (tests/distribute_run.py: `one`, `mirrored2`, `mirrored1`, `-float16`). Returns
  {name: npz}."""
  spec = ','.join(f'{name}={directory / (name + ".npz")}' for name in runs)
  output = finish(launch(spec, directory / 'init.pkl', episodes, *flags, env=env))
  results = {name: np.load(directory / f'{name}.npz') for name in runs}
  for name, result in results.items():
    replicas = REPLICAS[name.partition('-')[0]]
    assert int(result['replicas']) == replicas and f'{name}: {replicas} replicas' in output, (name, output[-3000:])
  return results


REPLICAS = dict(one=1, mirrored2=2, mirrored1=1)  # Of each named run (tests/distribute_run.py).


@pytest.fixture(scope='module')
def one_device(tmp_path_factory, episodes):
  """The initial weights (init.pkl, saved by the one-device run) and three runs of three steps from them: on one
  device (one.npz), mirrored over two CPUs (mirrored2.npz) and mirrored over one (mirrored1.npz)."""
  directory = tmp_path_factory.mktemp('distribute')
  runs = launch_runs(directory, episodes, ['one', 'mirrored2', 'mirrored1'])
  return directory, runs


def learning_rate(name, config=flags.define_config()):
  """The learning rate of the optimizer that trains the checkpoint entry `name` (None: not trained)."""
  if name.startswith(('_step', '_metrics')):
    return None
  return {'_actor': config.actor_lr, '_value': config.value_lr}.get(name.split('/')[0], config.model_lr)


def assert_same_updates(one, other, replicas=2, rtol=1e-4):
  """`other` made the same three updates as `one` from the same initial weights (init.pkl). The updates are compared in units of
  their optimizer's learning rate, as compare.py compares a train step's with the reference's: Adam divides each
  gradient by its running RMS, so a gradient that nearly cancels over the batch can move by float rounding (the
  replicas sum it in another order) into a visibly different update. Measured between one device and two
  replicas: at most 1.5e-4 of the learning rate on an AVX-512 CPU (oneDNN on and off), 2e-3 on an AMX one; the
  tolerance, as compare.py's, is 1e-2 on 99.9% of each variable's elements. Losses and gradient norms are sums
  over the batch, kept to `rtol`."""
  assert int(other['replicas']) == replicas
  names = list(one['names'])
  assert names == list(other['names'])
  for index, name in enumerate(names):
    a, b = one[f'w{index}'], other[f'w{index}']
    lr = learning_rate(name)
    if name == '_metrics/action_ent/total':  # A Monte-Carlo estimate that each replica samples for itself.
      np.testing.assert_allclose(a, b, rtol=0.05)
    elif lr is None:
      np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-6, err_msg=name)
    else:
      diff = np.abs(a.astype(np.float64) - b) / lr  # The updates' difference: both runs start from init.pkl.
      within = np.mean(diff <= compare.UPDATE_TOLERANCE)
      assert within >= compare.UPDATE_FRACTION, (
          f'{name}: {100 * within:.2f}% of the elements within {compare.UPDATE_TOLERANCE} of the learning rate '
          f'(largest difference {diff.max():.3g} of it)')
  metric_names = list(one['metric_names'])
  for column, name in enumerate(metric_names):
    if name != 'action_ent':
      np.testing.assert_allclose(one['metrics'][:, column], other['metrics'][:, column], rtol=rtol, atol=1e-6,
                                 err_msg=name)


@pytest.mark.xdist_group('one_device')
def test_weights_change_over_the_three_steps(one_device):
  directory, runs = one_device
  one = runs['one']
  import tools
  initial = tools.read_checkpoint(directory / 'init.pkl')
  names = list(one['names'])
  changed = [n for i, n in enumerate(names) if n.startswith(('_encode', '_actor', '_value'))
             and not np.allclose(initial[i], one[f'w{i}'])]
  assert any(n.startswith('_encode') for n in changed) and any(n.startswith('_actor') for n in changed)
  assert any(n.startswith('_value') for n in changed)


@pytest.mark.xdist_group('one_device')
def test_mirrored_over_two_cpus_matches_one_device(one_device):
  _, runs = one_device
  one, many = runs['one'], runs['mirrored2']
  assert_same_updates(one, many)
  # The input pipeline: a batch of 4 is 2 per replica, and the replicas take consecutive batches of one stream.
  assert one['images'].shape[:2] == (1, 4) and many['images'].shape[:2] == (2, 2)
  assert not np.array_equal(many['images'][0], many['images'][1])


@pytest.mark.xdist_group('one_device')
def test_mirrored_with_one_replica_matches_one_device(one_device):
  _, runs = one_device
  assert_same_updates(runs['one'], runs['mirrored1'], replicas=1)


def assert_nan_step_skipped(one, many):
  """Step 1 was skipped on one device and by both replicas, and the weights stayed finite (the metrics did average
  the NaN loss)."""
  column = list(one['metric_names']).index('nonfinite')
  for result in (one, many):
    assert result['metrics'][1, column] == 1, result['metrics'][:, column]
  for index, name in enumerate(one['names']):
    if not name.startswith('_metrics'):
      assert np.all(np.isfinite(many[f'w{index}'])), name


@pytest.fixture(scope='module')
def nan_runs(tmp_path_factory, episodes):
  """Per-element RSSM noise, pcont and one-hot actions, no clipping, and NaN images in step 1's second half (the
  second replica's): on one device and mirrored over two CPUs, in float32 and in float16 (one process)."""
  return launch_runs(tmp_path_factory.mktemp('nan'), episodes,
                     ['one', 'mirrored2', 'one-float16', 'mirrored2-float16'], '--shared_noise', 'False', '--pcont',
                     'True', '--action_dist', 'onehot', '--grad_clip', '0', env=with_env(NAN_STEP='1'))


@pytest.mark.xdist_group('nan')
def test_independent_noise_pcont_onehot_and_a_nan_replica_match_one_device(nan_runs):
  """Per-element RSSM noise and Gumbel-max one-hot samples are drawn for the global batch and sliced. Step 1's NaN
  images are all in the second replica's half: both replicas skip the step, as one device does. Without clipping,
  which would already turn every replica's gradients into NaN, a replica only skips because the finiteness is
  decided on the sum of the replicas' gradients. (One set of runs checks both, as the suite's time matters.)"""
  assert_same_updates(nan_runs['one'], nan_runs['mirrored2'])
  assert_nan_step_skipped(nan_runs['one'], nan_runs['mirrored2'])


@pytest.mark.xdist_group('nan')
def test_nan_on_one_replica_skips_the_step_on_all_under_float16(nan_runs):
  """The same NaN step under float16, through the loss scaler (which also lowers its scale): it sees only the first
  replica's finite part unless told otherwise.

  The runs are not compared weight for weight: whether a step overflows at a given loss scale depends on how the
  batch is split (the one-device run's third step fits in float16 where a replica's may not)."""
  assert_nan_step_skipped(nan_runs['one-float16'], nan_runs['mirrored2-float16'])


def free_ports(count):
  sockets = [socket.socket() for _ in range(count)]
  for s in sockets:
    s.bind(('127.0.0.1', 0))
  ports = [s.getsockname()[1] for s in sockets]
  for s in sockets:
    s.close()
  return ports


@pytest.mark.xdist_group('one_device')
def test_multi_worker_on_loopback_matches_one_device(one_device, episodes):
  directory, runs = one_device
  one = runs['one']
  workers = [f'127.0.0.1:{port}' for port in free_ports(2)]
  processes = []
  for index in range(2):
    env = dict(os.environ, TF_CONFIG=json.dumps(
        {'cluster': {'worker': workers}, 'task': {'type': 'worker', 'index': index}}))
    processes.append(launch(directory / f'worker{index}.npz', directory / 'init.pkl', episodes, env=env))
  try:
    for process in processes:
      finish(process)
  finally:
    for process in processes:
      process.kill()
  results = [np.load(directory / f'worker{index}.npz') for index in range(2)]
  for result in results:  # Every worker holds the same, one-device weights.
    assert_same_updates(one, result)
  # Each worker's input pipeline gives its one replica half the batch, from a stream of its own.
  images = [result['images'] for result in results]
  assert [i.shape[:2] for i in images] == [(1, 2)] * 2, [i.shape for i in images]
  assert not np.array_equal(images[0], images[1])


def test_training_run_with_mirrored_strategy(tmp_path):
  """The whole loop (prefill, distributed dataset, train, evaluation, checkpoint) under two replicas."""
  logdir = tmp_path / 'mirrored'
  result = run('--logdir', str(logdir), '--steps', '200', *TINY, '--distribute', 'mirrored', '--cpu_devices', '2')
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert 'MirroredStrategy with 2 replicas; each trains on 2 of the 4 sequences' in result.stdout
  assert (logdir / 'variables.pkl').exists()
  lines = [json.loads(line) for line in (logdir / 'metrics.jsonl').read_text().splitlines()]
  trained = [line for line in lines if 'model_loss' in line]
  assert trained and all(np.isfinite(line['model_loss']) for line in trained)


def test_batch_that_does_not_split_over_replicas_exits_2(tmp_path):
  result = run('--logdir', str(tmp_path / 'x'), *TINY, '--distribute', 'mirrored', '--cpu_devices', '3')
  assert result.returncode == 2 and 'Traceback' not in result.stderr, result.stderr[-2000:]  # The real command.
  assert '--batch_size 4 does not split evenly over the 3 replicas' in result.stderr
  assert 'use a multiple of 3' in result.stderr


def test_multi_worker_without_tf_config_exits_2(tmp_path, monkeypatch):
  monkeypatch.delenv('TF_CONFIG', raising=False)
  code, _, err = run_cli('--logdir', str(tmp_path / 'x'), *TINY, '--distribute', 'multi_worker')
  assert code == 2
  assert 'TF_CONFIG' in err
