"""Learning: on a fixed batch of real walker episodes, the world model's loss falls and the trained actor earns a
higher imagined return than its initial weights did."""


import numpy as np
import pytest
import tensorflow as tf


import dreamer
import tools
import wrappers

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group('learning')]  # Two seeds x 60 real train steps: slow;
# both use the module's episodes, rendered once.

# Per-pixel constant of Normal(mean, 1).log_prob summed over a 64x64x3 image: the part of image_loss no model removes.
IMAGE_FLOOR = 64 * 64 * 3 * 0.5 * np.log(2 * np.pi)


@pytest.fixture(scope='module')
def datadir(tmp_path_factory):
  """Three random-action episodes of dmc_walker_walk (100 agent steps each), rendered in a worker process: the
  tests train on one fixed batch of 8 windows drawn from them."""
  directory = tmp_path_factory.mktemp('episodes')
  env = wrappers.Async('walker', dict(task='dmc_walker_walk', action_repeat=2, time_limit=200, seed=1))
  try:
    space = env.action_space
    space.seed(0)
    random_agent = lambda obs, done, state: ([space.sample() for _ in done], None)
    tools.simulate(random_agent, [env], episodes=3, on_episode=lambda ep: tools.save_episodes(directory, [ep]))
  finally:
    env.close()
  assert tools.count_episodes(directory) == (3, 300)
  return directory


def imagined_return(agent, data, config):
  """The actor's objective under the agent's current weights, with fixed noise: mean discounted lambda-return of
  imagined trajectories from every posterior state of `data` (a raw batch, as the dataset yields it)."""
  seed = tf.constant([123, 4], tf.int64)
  data = dreamer.preprocess(data, config)
  post, _ = agent._dynamics.observe(agent._encode(data), data['action'], seed=seed)
  imag = agent._behavior(post, seed)
  return float(tf.reduce_mean(imag['weights'] * imag['returns']))


@pytest.mark.parametrize('seed', [0, 1])
def test_world_model_loss_falls_and_actor_improves(datadir, tmp_path, seed):
  # A 10x actor learning rate makes 60 steps of actor learning clearly visible.
  config = dreamer.parse_args([
      '--logdir', str(tmp_path), '--seed', str(seed), '--precision', '32', '--batch_size', '8',
      '--batch_length', '20', '--deter_size', '32', '--stoch_size', '8', '--num_units', '64', '--cnn_depth', '8',
      '--horizon', '10', '--actor_lr', '8e-4'])
  dreamer.setup(config)
  agent = dreamer.Dreamer(config, wrappers.spaces.Box(-1, 1, (6,)))
  data = next(dreamer.make_dataset(datadir, config, tf.distribute.get_strategy()))
  agent.train(data, [seed, 0])  # The loop's build step.
  initial_actor = [v.numpy() for v in agent._actor.weights]
  model_loss = []
  for update in range(1, 61):
    metrics = agent.train(data, [seed, update])
    model_loss.append(float(metrics['model_loss']))
    assert np.isfinite(float(metrics['actor_loss']))
  # Traced once per shape: the reference retraced its policy and leaked memory (its issue #19).
  assert agent._train_graph.experimental_get_tracing_count() == 1
  # The trained actor against its initial weights, both under the trained world model and value.
  trained = imagined_return(agent, data, config)
  for var, value in zip(agent._actor.weights, initial_actor):
    var.assign(value)
  initial = imagined_return(agent, data, config)
  image = np.asarray(data['image'][:2, 0])  # uint8, as the environment gives it.
  state = None
  for step in range(6):
    action, state = agent.policy({'image': image}, np.array([step % 3 == 0, False]), state, True)
    assert action.shape == (2, 6) and np.all(np.abs(action) <= 1)
  agent.policy({'image': image}, np.array([False, False]), state, False)
  agent.policy({'image': image}, np.array([True, True]), state, False)
  assert agent._policy.experimental_get_tracing_count() == 2  # One trace for training, one for evaluation.
  assert all(np.isfinite(model_loss))
  start, end = model_loss[0] - IMAGE_FLOOR, np.mean(model_loss[-5:]) - IMAGE_FLOOR
  assert end < 0.5 * start, (model_loss[0], model_loss[-5:])
  assert trained > initial + 0.1, (trained, initial)
