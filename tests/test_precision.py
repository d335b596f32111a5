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
