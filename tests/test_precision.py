"""Each dtype policy trains: float32, mixed_bfloat16 (CPU default) and mixed_float16 with loss scaling (GPU)."""


import keras
import numpy as np
import pytest


import dreamer
from helpers import fake_episodes, tiny_agent


@pytest.fixture(scope='module')
def datadir(tmp_path_factory):
  directory = tmp_path_factory.mktemp('episodes')
  fake_episodes(directory, 3)
  return directory


def train(datadir, tmp_path, policy, steps=3):
  agent, dataset, _ = tiny_agent(tmp_path, '--precision', '16', '--batch_size', '3', datadir=datadir,
                                 precision=policy)
  assert agent.precision == policy
  # Every layer has the policy the agent passed it; Keras's global policy is left alone.
  assert keras.mixed_precision.global_policy().name == 'float32'
  modules = [getattr(agent, n) for n in ('_encode', '_dynamics', '_decode', *dreamer.DENSE) if hasattr(agent, n)]
  layers = [l for m in modules for l in [m, *m._flatten_layers(include_self=False)]]
  assert {l.dtype_policy.name for l in layers} == {policy}, {l.name: l.dtype_policy.name for l in layers}
  data = next(dataset)
  agent.train(data, [0, 0])  # The loop's build step.
  metrics = [{k: float(np.mean(v)) for k, v in agent.train(data, [0, i]).items()} for i in range(1, steps + 1)]
  return agent, metrics


@pytest.mark.parametrize('policy', ['float32', 'mixed_bfloat16', 'mixed_float16'])
def test_policy_trains_with_float32_losses(datadir, tmp_path, policy):
  agent, metrics = train(datadir, tmp_path, policy)
  assert agent._float == policy.replace('mixed_', '')
  for step in metrics:
    # Losses are float32 in every policy. (Under float16 the first gradients overflow while the loss scale
    # comes down from 2**15; those steps are skipped and their norm is inf, as in the reference.)
    assert all(np.isfinite(v) for k, v in step.items() if 'grad_norm' not in k), step
    assert step['nonfinite'] == float(not np.isfinite(step['model_grad_norm']))
  scaled = isinstance(agent._model_opt._opt, keras.optimizers.LossScaleOptimizer)
  assert scaled == (policy == 'mixed_float16')  # Loss scaling only where float16 needs it.
  assert all(v.dtype == 'float32' for _, v in agent.checkpoint_table()[1:])  # Variables stay float32.


def test_float16_skips_overflows_then_trains_with_unscaled_norms(datadir, tmp_path):
  _, reference = train(datadir, tmp_path, 'float32', steps=1)
  agent, half = train(datadir, tmp_path, 'mixed_float16', steps=25)
  finite = [m for m in half if np.isfinite(m['model_grad_norm'])]
  assert finite, 'the loss scale never came down far enough'
  assert not np.isfinite(half[0]['model_grad_norm'])  # 2**15 overflows float16 at first...
  assert float(agent._model_opt._opt.dynamic_scale) < 2 ** 15  # ...and the scale came down.
  # Skipped steps leave the world model as it was, so the first applied step sees the same weights as float32's
  # first step. A norm still multiplied by the loss scale would be thousands of times larger.
  ratio = finite[0]['model_grad_norm'] / reference[0]['model_grad_norm']
  assert 0.2 < ratio < 5, (finite[0]['model_grad_norm'], reference[0]['model_grad_norm'])


def _graph_dtypes(graph):
  """The dtypes of every tensor a traced graph computes, its XLA cluster's and loop bodies' included."""
  dtypes = set()
  for op in graph.get_operations():
    dtypes.update(t.dtype.name for t in op.outputs)
    for attr in ('f', 'body', 'cond', 'then_branch', 'else_branch'):
      try:
        name = op.get_attr(attr).name
      except ValueError:  # The op has no such attribute.
        continue
      function = graph._get_function(name)
      assert function is not None, f'{op.name}: function {name} not found'  # Else its dtypes would go unseen.
      dtypes |= _graph_dtypes(function.graph)
  return dtypes


def test_under_bfloat16_the_actor_acts_in_float32_as_a_float32_agent(tmp_path):
  """A mixed_bfloat16 agent trains in bfloat16 but acts in float32 (faster at batch 1 on CPUs): its acting networks
  compute what a float32 agent with the same weights computes, its policy graph (the one the loop calls) has no
  bfloat16 tensor, and its layers keep their bfloat16 policy for training."""
  import tensorflow as tf
  half, dataset, _ = tiny_agent(tmp_path / 'half', precision='mixed_bfloat16')
  full, _, _ = tiny_agent(tmp_path / 'full', precision='float32')
  assert (half.acting_precision, full.acting_precision) == ('float32', 'float32')
  for (_, a), (_, b) in zip(half.checkpoint_table(), full.checkpoint_table()):
    b.assign(a)
  rng = np.random.default_rng(0)
  image = tf.constant(rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8))
  action = tf.constant(rng.uniform(-1, 1, (2, 6)), tf.float32)

  def act(agent):  # The policy's computation with seeded (stateless) samples, so that two agents can agree.
    state = agent._dynamics.initial(2)
    for t in range(3):
      embed = agent._encode(dreamer.preprocess({'image': image}, agent._c))
      state, _ = agent._dynamics.obs_step(state, action, embed, seed=tf.constant([t, 1], tf.int64))
      action_t = agent._actor(agent._dynamics.get_feat(state)).sample(seed=tf.constant([t, 2], tf.int64))
    return [tf.cast(x, tf.float32) for x in (state['deter'], state['mean'], state['std'], action_t)]

  def traced(agent):
    def run():
      with agent._acting():
        return act(agent)
    return [x.numpy() for x in tf.function(run, autograph=False)()]

  expected = traced(full)
  for got, want in zip(traced(half), expected):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  in_bfloat16 = [x.numpy() for x in tf.function(lambda: act(half), autograph=False)()]
  assert max(np.abs(a - b).max() for a, b in zip(in_bfloat16, expected)) > 1e-3  # What the tolerance tells apart.

  # The loop's policy: float32 throughout, with a float32 state; the layers' policies are back afterwards.
  obs = {'image': image.numpy()}
  _, state = half.policy(obs, np.array([True, True]), None, training=True, step=1000)
  _, state = half.policy(obs, np.array([False, True]), state, training=False)
  assert {v.dtype.name for v in tf.nest.flatten(state)} == {'float32'}
  for run in half._policy_graphs.values():
    assert 'bfloat16' not in _graph_dtypes(run.graph)
  layers = [l for m in (half._encode, half._dynamics, half._actor) for l in m._flatten_layers()]
  assert {l.dtype_policy.name for l in layers} == {'mixed_bfloat16'}
  assert 'bfloat16' in _graph_dtypes(half.train_graph(next(dataset), [0, 0]))  # Training still in bfloat16.
