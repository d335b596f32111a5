"""The whole train step against the original code's: one noise-free step from a reference checkpoint, compared
output by output (metrics, each optimizer's gradients before clipping, every variable's update, intermediates)
by compare.py. References: tests/data/train_step/* and the folders in DREAMER_TRAIN_REFERENCE_DIRS."""

import collections
import contextlib
import functools
import io
import os
import pathlib
import shutil

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_probability import distributions as tfd

import compare
import tools

DATA = pathlib.Path(__file__).resolve().parent / 'data'
TRAIN_STEP = DATA / 'train_step'
KINDS = ('out/metrics/', 'out/grad/model/', 'out/grad/actor/', 'out/grad/value/', 'out/update/', 'out/inter/')


def train_step_dirs():
  dirs = sorted(p for p in TRAIN_STEP.iterdir() if (p / 'refs_train.npz').exists())
  extra = os.environ.get('DREAMER_TRAIN_REFERENCE_DIRS', '')
  dirs += [pathlib.Path(p) for p in extra.split(':') if p]
  return dirs


def test_the_shipped_references_are_found():
  names = {p.name for p in train_step_dirs()}
  assert {'walker_default', 'onehot_pcont', 'onehot_free_nats0'} <= names, names


@pytest.fixture(scope='module')
def train_steps():
  """The port's noise-free train step per reference folder, run once for the tests of this module."""
  return functools.cache(compare.run_train_step)


@pytest.mark.xdist_group('train_step')  # The tests that share the module's train steps run on one worker.
@pytest.mark.parametrize('directory', train_step_dirs(), ids=lambda p: p.name)
def test_train_step_matches_the_reference(directory, train_steps):
  rows = compare.train_step_rows(*train_steps(directory))
  counts = collections.Counter(next(k for k in KINDS if row.name.startswith(k)) for row in rows
                               if row.name.startswith(KINDS))
  assert all(counts[k] for k in KINDS), f'a kind of output was not compared: {counts}'
  failed = [row for row in rows if not row.ok]
  assert not failed, failed


@pytest.mark.xdist_group('train_step')
def test_a_departing_output_fails_and_is_named(train_steps):
  refs, ours, lrs, trained = train_steps(TRAIN_STEP / 'onehot_free_nats0')
  refs = dict(refs)
  refs['out/metrics/div'] = refs['out/metrics/div'] + 1e-3
  refs['out/grad/actor/3'] = refs['out/grad/actor/3'] * 1.01
  refs['out/inter/lambda_returns'] = refs['out/inter/lambda_returns'] + 1e-3
  update = f'out/update/{int(refs["meta/value_pkl_index"][0])}'
  refs[update] = (refs[update] + 0.05 * lrs['value']).astype(refs[update].dtype)  # 5% of the lr on every element.
  failed = [row.name for row in compare.train_step_rows(refs, ours, lrs, trained) if not row.ok]
  assert failed == ['out/metrics/div', 'out/grad/actor/3', update, 'out/inter/lambda_returns'], failed
  # An optimizer that misses a variable the reference trains is named too.
  trained = dict(trained, actor=trained['actor'] - {int(refs['meta/actor_pkl_index'][0])})
  failed = [row.name for row in compare.train_step_rows(refs, ours, lrs, trained) if not row.ok]
  assert 'variables of the actor optimizer' in failed, failed


def run_main(*directories):
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    code = compare.main([str(d) for d in directories])
  return code, out.getvalue()


def test_a_reference_without_outputs_fails(tmp_path):
  source = TRAIN_STEP / 'onehot_pcont'
  shutil.copytree(source, tmp_path / 'train')
  refs = np.load(source / 'refs_train.npz')
  np.savez(tmp_path / 'train' / 'refs_train.npz', **{k: v for k, v in refs.items() if not k.startswith('out/')})
  code, text = run_main(tmp_path / 'train')
  assert code == 1 and 'no out/* arrays' in text and 'All outputs match' not in text, text
  # The same for a forward-output folder (refs.npz).
  forward = DATA / 'reference' / 'walker_default'
  (tmp_path / 'forward').mkdir()
  for name in ('variables.pkl', 'config.json'):
    (tmp_path / 'forward' / name).symlink_to(forward / name)
  np.savez(tmp_path / 'forward' / 'refs.npz', **{k: v for k, v in np.load(forward / 'refs.npz').items()
                                                  if k.startswith('in/')})
  code, text = run_main(tmp_path / 'forward')
  assert code == 1 and 'no out/* arrays' in text, text


def test_a_folder_without_checkpoint_is_an_input_error(tmp_path, capsys):
  target = tmp_path / 'lonely'
  target.mkdir()
  for name in ('refs_train.npz', 'config.json'):
    shutil.copy(TRAIN_STEP / 'onehot_free_nats0' / name, target / name)
  code, _ = run_main(target)
  assert code == 2
  assert 'has no variables.pkl' in capsys.readouterr().err


# The noise-free mode -------------------------------------------------------------------------------------------------

def test_zero_noise_draws_take_their_noise_free_values():
  mean = tf.constant([[0.5, -1.0], [2.0, 0.25]])
  std = tf.Variable([[1.0, 2.0], [0.5, 3.0]])
  for shared in (True, False):
    with tf.GradientTape() as tape:
      sample = tools.sample_normal(mean, std, shared, tools.ZERO_NOISE)
    np.testing.assert_array_equal(sample.numpy(), mean.numpy())
    np.testing.assert_array_equal(tape.gradient(sample, std).numpy(), np.zeros((2, 2)))
  assert tools.fold(tools.ZERO_NOISE, 3) is tools.ZERO_NOISE

  loc = tf.Variable([[0.3, -2.0, 4.0]])
  with tf.GradientTape() as tape:
    normal = tfd.Normal(loc, 0.7 * tf.ones_like(loc))  # The actor's tanh-normal, as ActionDecoder builds it.
    dist = tools.SampleDist(tfd.Independent(tfd.TransformedDistribution(normal, tools.TanhBijector()), 1))
    action = dist.sample(seed=tools.ZERO_NOISE)
  np.testing.assert_allclose(action.numpy(), np.tanh(loc.numpy()), rtol=1e-6)
  np.testing.assert_allclose(tape.gradient(action, loc).numpy(), 1 - np.tanh(loc.numpy()) ** 2, rtol=1e-5, atol=1e-6)

  logits = tf.Variable([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]])
  with tf.GradientTape() as tape:
    dist = tools.OneHotDist(logits)
    action = dist.sample(seed=tools.ZERO_NOISE)
    objective = tf.reduce_sum(action * tf.constant([1.0, 2.0, 3.0]))
  np.testing.assert_array_equal(action.numpy(), [[0, 1, 0], [1, 0, 0]])
  probs = tf.nn.softmax(logits).numpy()
  weights = np.array([1.0, 2.0, 3.0])
  # Straight-through: the gradient of sum(w * probs) with respect to the logits.
  expected = probs * (weights - (probs * weights).sum(-1, keepdims=True))
  np.testing.assert_allclose(tape.gradient(objective, logits).numpy(), expected, rtol=1e-5, atol=1e-7)


def test_the_training_graph_is_noise_free_only_when_asked():
  """The trace that trains (without the probe's extra outputs) makes the reference's noise-free step when given
  ZERO_NOISE, and samples with a training seed: other losses from the same weights."""
  refs, data, checkpoint = compare.train_step_files(TRAIN_STEP / 'onehot_pcont')
  config = compare.load_config(data)
  agent = compare.build_agent(config, refs['in/batch_action'].shape[-1], checkpoint)
  batch = {k: tf.constant(refs[f'in/batch_{k}']) for k in ('image', 'action', 'reward', 'discount')}
  metrics = agent.train(batch, tools.ZERO_NOISE)
  for name in ('model_loss', 'actor_loss', 'value_loss'):
    np.testing.assert_allclose(float(metrics[name]), refs[f'out/metrics/{name}'], rtol=1e-5, atol=1e-6)
  agent.load(checkpoint)  # The same weights again (the optimizers moved on, which the losses do not see).
  sampled = agent.train(batch, [0, 1])
  assert abs(float(sampled['model_loss']) - float(metrics['model_loss'])) > 1e-2, (sampled, metrics)
  assert abs(float(sampled['actor_loss']) - float(metrics['actor_loss'])) > 1e-4, (sampled, metrics)
