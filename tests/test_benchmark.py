"""The benchmark command and its FLOP count."""

import json
import os
import pathlib
import re

import numpy as np
import pytest
import tensorflow as tf

import benchmark
import benchmark_ab
from helpers import ROOT, optimized_graphs, run_cli


def test_graph_flops_counts_convolutions_their_gradients_and_matmuls():
  image = tf.random.normal((2, 8, 8, 3))
  kernel = tf.Variable(tf.random.normal((3, 3, 3, 4)))
  weight = tf.Variable(tf.random.normal((144, 5)))

  @tf.function
  def step(image):
    with tf.GradientTape() as tape:
      x = tf.nn.conv2d(image, kernel, 1, 'VALID')  # [2, 6, 6, 4]
      y = tf.matmul(tf.reshape(x, (2, 144)), weight)  # [2, 5]
      loss = tf.reduce_sum(y)
    grads = tape.gradient(loss, [kernel, weight])
    kernel.assign_sub(0.1 * grads[0])
    weight.assign_sub(0.1 * grads[1])
    return loss

  flops = benchmark.graph_flops(step.get_concrete_function(image).graph)
  conv = 2 * (3 * 3 * 3 * 4) * (2 * 6 * 6)
  matmul = 2 * 2 * 144 * 5
  assert flops['Conv2D'] == conv
  assert flops['Conv2DBackpropFilter'] == conv
  assert 'Conv2DBackpropInput' not in flops  # No gradient is needed for the image, so it does not run.
  assert flops['MatMul'] == 3 * matmul  # Forward, and the gradients for the weight and for x.


def test_graph_flops_counts_a_loop_body_once_per_iteration():
  weight = tf.Variable(tf.random.normal((4, 4)))

  @tf.function
  def step(inputs):  # [7, 2, 4]
    with tf.GradientTape() as tape:
      states = tf.scan(lambda state, x: tf.matmul(state + x, weight), inputs, tf.zeros((2, 4)))
      loss = tf.reduce_sum(states)
    weight.assign_sub(0.1 * tape.gradient(loss, weight))
    return loss

  flops = benchmark.graph_flops(step.get_concrete_function(tf.zeros((7, 2, 4))).graph)
  matmul = 2 * 2 * 4 * 4
  # Per iteration: the forward matmul, and in the gradient loop the gradients for the weight and for the state.
  assert flops['MatMul'] == 7 * 3 * matmul, flops


def test_kernel_calls_count_each_kernel_per_loop_iteration_and_the_floor_times_them():
  weight = tf.Variable(tf.random.normal((4, 4)))
  kernel = tf.Variable(tf.random.normal((3, 3, 3, 4)))
  # Not square: the gradients include [3, 2] x [5, 2]^T (n = 5 from the transposed b) and [5, 3]^T-style matmuls.
  proj, head = tf.Variable(tf.random.normal((2, 5))), tf.Variable(tf.random.normal((5, 2)))
  wide = tf.Variable(tf.random.normal((5, 5, 3, 2)))

  @tf.function
  def step(inputs, image):  # [7, 2, 4], [2, 8, 8, 3]
    with tf.GradientTape() as tape:
      states = tf.scan(lambda state, x: tf.matmul(state + x, weight), inputs, tf.zeros((2, 4)))
      loss = tf.reduce_sum(states) + tf.reduce_sum(tf.nn.conv2d(image, kernel, 1, 'VALID'))
      loss += tf.reduce_sum(tf.transpose(image[:, 0, :3, 0]) @ proj @ head)  # [3, 2] @ [2, 5] @ [5, 2]
      # SAME padding, stride 2, on a watched input: a Conv2D [2, 8, 8, 3] -> [2, 4, 4, 2] and (for both
      # convolutions) Conv2DBackpropInput and Conv2DBackpropFilter.
      tape.watch(image)
      loss += tf.reduce_sum(tf.nn.conv2d(image, wide, 2, 'SAME'))
    grads = tape.gradient(loss, [weight, kernel, proj, head, wide, image])
    for variable, grad in zip((weight, kernel, proj, head, wide), grads):
      variable.assign_sub(0.1 * grad)
    return loss, grads[-1]  # The input gradient returned, so that it runs.

  graph = step.get_concrete_function(tf.zeros((7, 2, 4)), tf.zeros((2, 8, 8, 3))).graph
  calls = benchmark.kernel_calls(graph)
  by_kind = {}
  for (kind, shapes, dtype, _), count in calls.items():
    assert dtype == 'float32'
    by_kind[kind] = by_kind.get(kind, 0) + count
  assert by_kind == {'MatMul': 7 * 3 + 5, 'Conv2D': 2, 'Conv2DBackpropFilter': 2, 'Conv2DBackpropInput': 2}, by_kind
  conv = [key for key in calls if key[0] == 'Conv2D' and dict(key[3])['padding'] == b'VALID'][0]
  assert conv[1] == ((2, 8, 8, 3), (3, 3, 3, 4))
  # Hand-counted: 2 x filter size x output positions of the forward convolution, for it and its gradients.
  expected = {((2, 8, 8, 3), (3, 3, 3, 4)): 2 * (3 * 3 * 3 * 4) * (2 * 6 * 6),
              ((2, 8, 8, 3), (5, 5, 3, 2)): 2 * (5 * 5 * 3 * 2) * (2 * 4 * 4)}
  for kind, shapes, _, attrs in calls:
    if kind.startswith('Conv2D'):
      assert benchmark.kernel_flops(kind, shapes, dict(attrs)) == expected[shapes[:2]], (kind, shapes)
  # Each kernel's FLOPs, times its calls, add up to what graph_flops counts for those ops.
  counted = {}
  for (kind, shapes, _, attrs), count in calls.items():
    counted[kind] = counted.get(kind, 0) + count * benchmark.kernel_flops(kind, shapes, dict(attrs))
  flops = benchmark.graph_flops(graph)
  assert counted == {kind: flops[kind] for kind in counted}, (counted, flops)
  floor, seconds, largest = benchmark.kernel_floor(graph, budget_s=0.05, largest=100)
  assert set(seconds) == set(by_kind) and all(s > 0 for s in seconds.values())
  assert np.isclose(floor, sum(seconds.values()))
  # The largest kernels (here all of them), by time per step, with their rates.
  assert len(largest) == len(calls) and [r['ms'] for r in largest] == sorted((r['ms'] for r in largest), reverse=True)
  assert np.isclose(sum(r['ms'] for r in largest), 1e3 * floor)
  for row in largest:
    key = next(k for k in calls if k[0] == row['op'] and [list(s) for s in k[1]] == row['shapes'])
    assert row['calls'] == calls[key] and np.isclose(row['ms'], row['ms_per_call'] * row['calls'])
    rate = benchmark.kernel_flops(*key[:2], dict(key[3])) / (row['ms_per_call'] / 1e3) / 1e9
    assert np.isclose(row['gflops'], rate, rtol=1e-3), row


def test_under_one_thread_per_op_the_floor_and_peak_run_their_copies_side_by_side_unmerged(monkeypatch):
  # runtime.lanes() is 2 on two cores with --intra_op_threads 1; copies of one computation must stay copies
  # (grappler merges identical ones: the peak's first version timed one chain and doubled it).
  import runtime
  monkeypatch.setattr(runtime, 'lanes', lambda: 2)

  def matmuls(fn):
    return max(sum(node.op.endswith('MatMul') for node in g.post_optimization_graph.node)
               for g in optimized_graphs(fn))

  assert matmuls(lambda: benchmark.peak_gflops(tf.float32, size=64, repeats=3)) == 2 * 3
  attrs = (('transpose_a', False), ('transpose_b', False))
  # With grappler on, each lane's repeats (one op on the same inputs) merge into one, which is why kernel_floor
  # turns it off; the lanes, on their own inputs, stay apart.
  assert matmuls(benchmark._kernel_fn('MatMul', ((64, 32), (32, 16)), 'float32', attrs, 3, lanes=2)) == 2
  options = tf.config.optimizer.get_experimental_options()
  tf.config.optimizer.set_experimental_options({'disable_meta_optimizer': True})  # As kernel_floor runs them.
  try:
    assert matmuls(benchmark._kernel_fn('MatMul', ((64, 32), (32, 8)), 'float32', attrs, 3, lanes=2)) == 2 * 3
  finally:
    tf.config.optimizer.set_experimental_options(options)


@pytest.mark.e2e
def test_benchmark_command_writes_its_json(tmp_path):
  code, out, err = run_cli('--logdir', str(tmp_path), '--benchmark', 'True', '--preset', 'debug',
                           '--precision', '32')  # In this process: TensorFlow is imported already.
  assert code == 0, out[-2000:] + err[-2000:]
  data = json.loads((tmp_path / 'benchmark.json').read_text())
  for key in ('device', 'precision', 'first_train_step_s', 'train_step_s', 'gflop_per_train_step', 'achieved_gflops',
              'peak_gflops', 'policy_step_ms', 'env_step_ms', 'hours_per_1e6_env_steps'):
    assert key in data, key
  assert data['precision'] == 'float32' and data['device'].startswith('CPU')
  # The machine kind and the oneDNN setting of the figures (on: the default on x86, unless the user set it).
  expected = os.environ.get('TF_ENABLE_ONEDNN_OPTS') == '1'
  assert data['onednn'] is expected and f"oneDNN {'on' if expected else 'off'}" in data['device'], data['device']
  assert 'AVX' in data['device'], data['device']
  # The persistent XLA cache this process ran with (conftest.py configured the test process as dreamer.py does):
  # none unless DREAMER_XLA_CACHE or TF_XLA_FLAGS named one.
  named = re.search(r'--tf_xla_persistent_cache_directory=(\S+)', os.environ.get('TF_XLA_FLAGS', ''))
  cache = data['xla_cache']
  if named:
    assert cache['dir'] == named.group(1) and cache['entries'] <= len(list(pathlib.Path(named.group(1)).glob('*.pb')))
  else:
    assert cache == {'dir': None, 'entries': 0}, cache
  assert data['train_step_s']['n'] >= 5 and 0 < data['train_step_s']['min'] <= data['train_step_s']['median']
  assert data['gflop_per_train_step'] > 0 and data['peak_gflops'] > 1 and data['train_step_ops'] > 1000
  assert np.isclose(data['achieved_gflops'], data['gflop_per_train_step'] / data['train_step_s']['median'])
  # The kernel floor: the step's convolutions and matmuls timed alone, summed; the step takes longer than that.
  assert {'Conv2D', 'Conv2DBackpropInput', 'Conv2DBackpropFilter', 'MatMul'} <= set(data['kernel_floor_s_by_op'])
  assert np.isclose(data['kernel_floor_s'], sum(data['kernel_floor_s_by_op'].values()))
  assert 0 < data['kernel_floor_s'] < data['train_step_s']['median']
  assert 0 < len(data['kernel_floor_largest']) <= 12 and data['kernel_floor_largest'][0]['gflops'] > 0
  assert np.isclose(data['train_step_over_kernel_floor'], data['train_step_s']['median'] / data['kernel_floor_s'])
  assert 0 < data['policy_step_ms']['median'] < 1000 and 0 < data['env_step_ms']['median'] < 1000
  # The float32 actor's policy is XLA-compiled by default; the plain graph is timed in turns beside it.
  assert data['policy_xla'] is True and data['policy_step_ms']['n'] == 200
  assert data['policy_step_ms_plain_graph']['n'] == 200 and 'policy_step_ms_xla' not in data
  # PlaNet's planner (1000 candidates x 12 steps x 10 iterations) per agent step costs more than the actor's.
  assert data['cem_policy_step_ms']['n'] == 10
  assert data['policy_step_ms']['median'] < data['cem_policy_step_ms']['median'] < 60000
  # The op-level profile names the network's parts and the kinds of ops that ran.
  assert any('Conv2D' in kind for kind in data['op_ms_by_kind']), data['op_ms_by_kind']
  parts = data['op_ms_by_part']
  assert {'encode', 'decode', 'grad encode', 'grad decode'} <= set(parts), parts
  assert all(ms > 0 for ms in parts.values())
  assert 'train_step_s' in out and 'Wrote' in out
  assert not (tmp_path / 'episodes').exists()


@pytest.mark.e2e
def test_benchmark_ab_runs_old_and_new_in_turns_and_reports_both(tmp_path):
  """benchmark_ab.py: the old commit (git archive of HEAD here) and the working tree, alternating, each a real
  benchmark run; ab.json has both sides' figures and the speed-up of the medians; a bad --old exits with 2."""
  import subprocess
  import sys
  result = subprocess.run(
      [sys.executable, str(ROOT / 'benchmark_ab.py'), '--old', 'HEAD', '--pairs', '1', '--outdir', str(tmp_path),
       '--', '--preset', 'debug', '--precision', '32'], capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
  data = json.loads((tmp_path / 'ab.json').read_text())
  assert [(r['side'], r['pair']) for r in data['runs']] == [('old', 0), ('new', 0)]
  for side in ('old', 'new'):
    run = json.loads((tmp_path / f'{side}_0' / 'benchmark.json').read_text())
    assert data['medians'][side]['train_step_s'] == run['train_step_s']['median'] > 0
    assert data['medians'][side]['kernel_floor_s'] == run['kernel_floor_s']
  assert np.isclose(data['train_step_speedup'], data['medians']['old']['train_step_s']
                    / data['medians']['new']['train_step_s'])
  assert data['device'].startswith('CPU') and 'Median train step: old' in result.stdout
  # An older commit's benchmark without a figure (the kernel floor came in session 10): n/a, not a crash.
  run = json.loads((tmp_path / 'old_0' / 'benchmark.json').read_text())
  del run['kernel_floor_s']
  values = benchmark_ab.figures(run)
  assert values['kernel_floor_s'] is None and values['train_step_s'] == run['train_step_s']['median']
  assert benchmark_ab.median([None, 2.0, 4.0]) == 3.0 and benchmark_ab.median([None]) is None
  bad = subprocess.run([sys.executable, str(ROOT / 'benchmark_ab.py'), '--old', 'no-such-commit'],
                       capture_output=True, text=True, timeout=120)
  assert bad.returncode == 2 and 'no-such-commit' in bad.stderr and 'Traceback' not in bad.stderr, bad.stderr
