"""The acting side of dreamer.py on real TF graphs, with tiny agents (--preset debug) built without a replay:
exploration and its schedule, policy resets, reward clipping (preprocess and the dataset) and episode summaries.

Statistical checks use fixed seeds; each tolerance is stated next to it in standard errors of the estimate."""

import json
import math

import numpy as np
import pytest
import tensorflow as tf
from gymnasium import spaces

import dreamer
import loop
import seeds
import tools
from helpers import build_agent

BOX = spaces.Box(-1, 1, (3,))
N = 4000  # Environment rows of one policy call for the statistics.


def make_agent(*argv, actspace=BOX):
  return build_agent(['--preset', 'debug', *argv], actspace)


def images(rows, seed=0):
  return {'image': np.random.RandomState(seed).randint(0, 256, (rows, 64, 64, 3)).astype(np.uint8)}


def steer_actor(agent, raw):
  """Makes the actor ignore its input: the last layer's kernel is zeroed and its bias (the raw output) set."""
  hout = agent._actor.hout
  hout.kernel.assign(tf.zeros_like(hout.kernel))
  hout.bias.assign(tf.constant(raw, tf.float32))


def steer_tanh_normal(agent, action):
  """The tanh-normal actor then gives `action` [A] up to its minimal std 1e-4: the Normal's mean 5 tanh(raw / 5)
  is atanh(action), and its std softplus(-40 + log(e^5 - 1)) + 1e-4 is 1e-4."""
  mean = 5 * np.arctanh(np.arctanh(np.asarray(action, np.float64)) / 5)
  steer_actor(agent, np.concatenate([mean, np.full(len(action), -40.0)]))


def act(agent, training, rows=N, seed=0, step=0):
  action, _ = agent.policy(images(rows, seed), np.ones(rows, bool), None, training, step)
  return action


def normal_tail(z):
  """P(X > z) for a standard normal X."""
  return 0.5 * (1 - math.erf(z / math.sqrt(2)))


# Exploration --------------------------------------------------------------------------------------------------------

def test_actor_is_steered():
  # The helper the exploration tests rely on: without noise the policy gives the chosen action.
  agent = make_agent('--expl_amount', '0.3', '--eval_noise', '0.0')
  steer_tanh_normal(agent, [0.0, 0.5, 0.95])
  np.testing.assert_allclose(act(agent, training=False, rows=50), np.tile([0.0, 0.5, 0.95], (50, 1)), atol=1e-3)


def test_additive_gaussian_noise_has_the_amount_as_std_and_is_clipped():
  agent = make_agent('--expl', 'additive_gaussian', '--expl_amount', '0.3')
  steer_tanh_normal(agent, [0.0, 0.5, 0.95])
  action = act(agent, training=True)
  assert action.shape == (N, 3) and action.dtype == np.float32
  assert action.min() >= -1 and action.max() <= 1
  # Away from the bounds (clipping at 1 / 0.3 sigma touches 0.1% of the draws): Normal(0, 0.3). The standard error
  # of the mean is 0.3 / sqrt(N) = 0.005, of the std 0.3 / sqrt(2N) = 0.0034; tolerances are 5 of them.
  noise = action[:, 0]
  assert abs(noise.mean()) < 0.025
  assert abs(noise.std() - 0.3) < 0.017
  assert abs(np.mean(np.abs(noise) < 0.3) - 0.6827) < 0.04  # Within one std; standard error 0.0074.
  # Near the bound the draws above 1 are clipped to exactly 1: P(N(0, 0.3) > 1 - a). Standard errors <= 0.008.
  for dim, mean in ((1, 0.5), (2, 0.95)):
    expected = normal_tail((1 - mean) / 0.3)
    assert abs(np.mean(action[:, dim] == 1.0) - expected) < 0.04, (dim, np.mean(action[:, dim] == 1.0), expected)


def test_completely_random_is_uniform_whatever_the_actor():
  agent = make_agent('--expl', 'completely_random', '--expl_amount', '0.3')
  steer_tanh_normal(agent, [0.9, -0.9, 0.0])
  action = act(agent, training=True)
  assert action.min() >= -1 and action.max() <= 1
  # Uniform(-1, 1) per dimension: mean 0 (standard error 0.577 / sqrt(N) = 0.009), variance 1/3 (standard error
  # 0.0047), ten equal bins of 0.1 (standard error 0.0047); tolerances are 4 to 5 of them.
  np.testing.assert_array_less(np.abs(action.mean(0)), 0.04)
  np.testing.assert_array_less(np.abs(action.var(0) - 1 / 3), 0.02)
  for dim in range(3):
    fractions = np.histogram(action[:, dim], bins=10, range=(-1, 1))[0] / N
    np.testing.assert_array_less(np.abs(fractions - 0.1), 0.02)


def test_epsilon_greedy_replaces_whole_rows_per_environment():
  agent = make_agent('--action_dist', 'onehot', '--expl', 'epsilon_greedy', '--expl_amount', '0.4',
                     actspace=spaces.Discrete(5))
  explore = tf.function(lambda action, seed: agent._exploration(action, True, tf.constant(0.4), seed),
                        autograph=False)
  E, calls = 8, 400
  marker = tf.fill([E, 5], 0.5)  # Not one-hot: a kept row is told apart from a replaced one.
  draws = np.stack([explore(marker, tf.constant(seeds.act(0, call), tf.int32)).numpy()
                    for call in range(calls)])  # [calls, E, 5]
  kept = np.all(draws == 0.5, -1)
  replaced = ~kept
  # The mask is per row: a row is kept or replaced as a whole, by a one-hot action.
  assert np.all(np.isin(draws[replaced], [0.0, 1.0])) and np.all(draws[replaced].sum(-1) == 1)
  # Each environment is replaced in about `amount` of the steps (standard error 0.0245 over 400 calls; 4 of them).
  np.testing.assert_array_less(np.abs(replaced.mean(0) - 0.4), 0.1)
  # Rows of one call are drawn independently: all-or-none calls have probability 0.6^8 + 0.4^8 = 0.017.
  assert np.mean((replaced.sum(1) > 0) & (replaced.sum(1) < E)) > 0.9
  # The replacing action is uniform over the 5 classes (about 1280 draws, standard error 0.011; 4.5 of them).
  classes = draws[replaced].argmax(-1)
  np.testing.assert_array_less(np.abs(np.bincount(classes, minlength=5) / len(classes) - 0.2), 0.05)


def test_epsilon_greedy_policy_gives_one_hot_actions():
  agent = make_agent('--action_dist', 'onehot', '--expl', 'epsilon_greedy', '--expl_amount', '0.4',
                     '--eval_noise', '0.0', actspace=spaces.Discrete(5))
  steer_actor(agent, [30.0, 0.0, 0.0, 0.0, 0.0])  # The actor picks class 0 (probability 1 - 4e-13).
  np.testing.assert_array_equal(act(agent, training=False, rows=100), np.eye(5)[np.zeros(100, int)])
  action = act(agent, training=True)
  assert np.all(np.isin(action, [0.0, 1.0])) and np.all(action.sum(-1) == 1)
  # 40% of the rows get a uniform class: 8% each of classes 1-4 (standard error 0.0043; 4.5 of them).
  fractions = action.mean(0)
  np.testing.assert_array_less(np.abs(fractions[1:] - 0.08), 0.02)
  assert abs(fractions[0] - 0.68) < 0.035


# Seeds --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('jit', ['True', 'False'])
@pytest.mark.parametrize('expl', ['additive_gaussian', 'completely_random'])
def test_acting_noise_follows_the_seed_also_under_xla(jit, expl):
  # Under XLA (--jit_policy) stateful draws ignore TensorFlow's seeds: every --seed drew the same exploration
  # noise. The actor is steered to one action, so only the noise tells the agents apart.
  def noise(flag_seed, calls=2, **kwargs):
    agent = make_agent('--seed', str(flag_seed), '--jit_policy', jit, '--expl', expl, '--expl_amount', '0.3')
    assert agent.policy_xla == (jit == 'True')
    steer_tanh_normal(agent, [0.0, 0.5, -0.5])
    return [agent.policy(images(64), np.ones(64, bool), None, True, **kwargs)[0] for _ in range(calls)]
  first, second = noise(0)
  np.testing.assert_array_equal(noise(0)[0], first)  # The same seed draws the same, in a new agent too.
  assert np.abs(first - second).max() > 0.1  # Each call draws anew ...
  assert np.abs(noise(1)[0] - first).max() > 0.1  # ... and another --seed draws otherwise.
  # The call index (the loop's count) decides the draws: the agent's own count starts at 0. Every bit of it counts,
  # also under XLA, which reads only the low 32 bits of an int64 seed.
  np.testing.assert_array_equal(noise(0, calls=1, call=0)[0], first)
  assert np.abs(noise(0, calls=1, call=7)[0] - first).max() > 0.1
  assert np.abs(noise(0, calls=1, call=7 + 2 ** 32)[0] - noise(0, calls=1, call=7)[0]).max() > 0.1


@pytest.mark.parametrize('jit', ['True', 'False'])
def test_the_evaluation_mode_follows_the_seed(jit):
  # The tanh-normal's mode is the most likely of 100 samples: drawn from the call's seed too. The actor ignores
  # its input (so the latent sample plays no part) and has a wide std (so the samples spread).
  agent = make_agent('--eval_noise', '0.0', '--jit_policy', jit)
  steer_actor(agent, [0.0, 0.0, 0.0, 5.0, 5.0, 5.0])
  draw = lambda call: agent.policy(images(2), np.ones(2, bool), None, False, call=call)[0]
  np.testing.assert_array_equal(draw(3), draw(3))
  assert np.abs(draw(3) - draw(4)).max() > 0.01


def test_the_latent_sample_follows_the_seed():
  agent = make_agent()
  draw = lambda call: agent.policy(images(2), np.ones(2, bool), None, False, call=call)[1][0]['stoch'].numpy()
  np.testing.assert_array_equal(draw(3), draw(3))
  assert np.abs(draw(3) - draw(4)).max() > 0.1


STATEFUL_RANDOM = ('RandomStandardNormal', 'RandomUniform', 'RandomUniformInt', 'TruncatedNormal', 'Multinomial',
                   'RandomGamma', 'RandomPoisson', 'RandomPoissonV2', 'RandomShuffle', 'ParameterizedTruncatedNormal',
                   'RngReadAndSkip', 'RngSkip', 'StatefulStandardNormalV2', 'StatefulUniform', 'StatefulUniformInt',
                   'StatefulUniformFullInt', 'StatefulTruncatedNormal', 'StatefulRandomBinomial')


def random_ops(graph_def):
  """The op types of a graph and of every function in its library."""
  nodes = list(graph_def.node) + [n for f in graph_def.library.function for n in f.node_def]
  return [n.op for n in nodes if 'Random' in n.op or n.op.startswith('Stateful') or n.op.startswith('Rng')
          or n.op == 'Multinomial']


@pytest.mark.parametrize('argv, actspace', [
    ([], BOX), (['--jit_policy', 'False'], BOX), (['--expl', 'completely_random'], BOX),
    (['--behavior', 'cem', '--cem_candidates', '8', '--cem_topk', '2', '--cem_iterations', '2'], BOX),
    (['--action_dist', 'onehot', '--expl', 'epsilon_greedy'], spaces.Discrete(4))],
    ids=['actor', 'plain_graph', 'completely_random', 'cem', 'epsilon_greedy'])
def test_every_draw_of_the_policy_is_stateless(argv, actspace):
  # A stateful draw in the policy ignores the seed under XLA and is not reproducible by call: there is none, in
  # either mode. (The scan sees the stateless draws, so it would see stateful ones.)
  agent = make_agent('--eval_noise', '0.1', *argv, actspace=actspace)
  for training in (True, False):
    agent.policy(images(2), np.ones(2, bool), None, training)
  assert len(agent._policy_graphs) == 2
  for run in agent._policy_graphs.values():
    ops = random_ops(run.graph.as_graph_def())
    assert any(op.startswith('StatelessRandom') for op in ops), ops
    assert not set(ops) & set(STATEFUL_RANDOM), sorted(set(ops))


def test_the_loop_seeds_acting_from_the_step_it_starts_at(tmp_path):
  # A resumed run draws new acting noise: the trainer's first call at env step S has the index first_act(S).
  config = dreamer.parse_args(['--preset', 'debug', '--expl_amount', '0.3', '--train_every', '1000000',
                               '--seed', '3'])
  agent = dreamer.Dreamer(config, BOX)
  steer_tanh_normal(agent, [0.0, 0.0, 0.0])
  counter = loop.Counter(tmp_path, config.action_repeat)
  counter.step = 5000
  trainer = loop.Trainer(agent, None, config, counter, loop.Logger(tmp_path, None, config.steps))
  trainer._should_train(counter.step)  # Not at a round now.
  policy = trainer.policy(training=True)
  first, _ = policy(images(8), np.ones(8, bool), None)
  second, _ = policy(images(8), np.ones(8, bool), None)
  for call, got in ((seeds.first_act(5000), first), (seeds.first_act(5000) + 1, second)):
    want, _ = agent.policy(images(8), np.ones(8, bool), None, True, 5000, call)
    np.testing.assert_array_equal(got, want)
  assert seeds.first_act(5000) > 0 and np.abs(first - second).max() > 0.1


def test_acting_seeds_are_int32_hashes_of_seed_worker_and_call():
  # int32 [2], the same for the same inputs, apart for any other seed, worker or call (also calls 2^32 apart).
  base = seeds.act(0, 5)
  assert len(base) == 2 and all(-2 ** 31 <= x < 2 ** 31 for x in base)
  assert seeds.act(0, 5) == base
  others = [seeds.act(1, 5), seeds.act(0, 6), seeds.act(0, 5, worker=1), seeds.act(0, 5 + 2 ** 32), seeds.act(-1, 5)]
  assert len({tuple(base)} | {tuple(o) for o in others}) == 6
  assert base != seeds.train_step(0, 5)


# Schedule -----------------------------------------------------------------------------------------------------------

def test_expl_amount_halves_every_expl_decay_steps_down_to_expl_min():
  agent = make_agent('--expl_amount', '0.4', '--expl_decay', '1000', '--expl_min', '0.1', '--eval_noise', '0.05')
  for step, amount in [(0, 0.4), (500, 0.4 / math.sqrt(2)), (1000, 0.2), (1500, 0.2 / math.sqrt(2)),
                       (2000, 0.1), (3000, 0.1), (10 ** 6, 0.1)]:
    assert agent._expl_amount(True, step) == pytest.approx(amount, rel=1e-12), step
    assert agent._expl_amount(False, step) == 0.05  # Evaluation uses eval_noise, at any step.
  agent = make_agent('--expl_amount', '0.4', '--expl_decay', '1000')  # No floor.
  assert agent._expl_amount(True, 3000) == pytest.approx(0.05, rel=1e-12)
  agent = make_agent('--expl_amount', '0.4')  # No decay.
  assert agent._expl_amount(True, 10 ** 6) == 0.4


def test_policy_noise_follows_the_schedule_and_eval_noise():
  agent = make_agent('--expl_amount', '0.4', '--expl_decay', '1000', '--expl_min', '0.05', '--eval_noise', '0.1')
  steer_tanh_normal(agent, [0.0, 0.0, 0.0])
  noise = act(agent, training=True, step=1000)  # One halving: 0.2.
  assert abs(noise.std() - 0.2) < 0.01  # Standard error 0.2 / sqrt(6N) = 0.0013 over the 3 dims.
  metric = agent._metrics['expl_amount']
  assert metric.result() == pytest.approx(0.2) and float(metric.count.numpy()) == 1
  # Evaluation: the actor's mode plus eval_noise, whatever the schedule says; not counted in the metric.
  noise = act(agent, training=False, seed=1, step=1000)
  assert abs(noise.std() - 0.1) < 0.005
  assert float(metric.count.numpy()) == 1
  # Training after 5 halvings (0.0125) is floored at expl_min.
  assert abs(act(agent, training=True, seed=2, step=5000).std() - 0.05) < 0.0025


# Policy resets ------------------------------------------------------------------------------------------------------

def rows(state, index):
  latent, action = state
  return {k: v[index:index + 1] for k, v in latent.items()}, action[index:index + 1]


@pytest.mark.parametrize('reset', [[True, False], [False, True]], ids=['first', 'second'])
def test_reset_zeroes_the_state_of_exactly_the_reset_environments(reset):
  agent = make_agent()
  _, state = agent.policy(images(2, seed=0), np.ones(2, bool), None, True)
  _, state = agent.policy(images(2, seed=1), np.zeros(2, bool), state, True)  # From zeros the GRU stays at 0.
  for value in [*state[0].values(), state[1]]:
    assert np.all(np.abs(value.numpy()).sum(-1) > 0.01), value  # No part of the state to reset is zero.
  obs = images(2, seed=2)
  _, (latent, _) = agent.policy(obs, np.array(reset), state, True)
  # The deterministic parts of the new state (the GRU state, the posterior's mean and std) for each row, compared
  # with a fresh start (no state) and with continuing that row's state. (The stochastic sample is not compared.)
  for index, was_reset in enumerate(reset):
    row = {'image': obs['image'][index:index + 1]}
    _, (fresh, _) = agent.policy(row, np.array([True]), None, True)
    _, (continued, _) = agent.policy(row, np.array([False]), rows(state, index), True)
    want, other = (fresh, continued) if was_reset else (continued, fresh)
    for key in ('deter', 'mean', 'std'):
      got = latent[key].numpy()[index]
      np.testing.assert_allclose(got, want[key].numpy()[0], rtol=1e-5, atol=1e-6, err_msg=(index, key))
      assert np.abs(got - other[key].numpy()[0]).max() > 1e-3, (index, key)  # Resetting makes a difference.


def test_policy_runs_one_graph_per_mode_and_batch_and_matches_the_traced_function():
  # policy() calls the traced graph directly (no tf.function dispatch); it must be the function's own graph.
  agent = make_agent('--eval_noise', '0.0')
  state = None
  for seed in range(3):
    obs, before = images(2, seed), state
    _, state = agent.policy(obs, np.array([seed == 0, False]), state, False, call=seed)
  assert agent._policy.experimental_get_tracing_count() == 1  # The first state (zeros) and later ones share it.
  _, (direct, _) = agent._policy(tf.constant(obs['image']), tf.constant([False, False]), before, False,
                                 tf.constant(0.0), tf.constant(seeds.act(0, 2), tf.int32))  # --seed 0, call 2.
  for key in ('deter', 'mean', 'std', 'stoch'):  # The same seed: the posterior sample agrees too.
    np.testing.assert_array_equal(state[0][key].numpy(), direct[key].numpy(), err_msg=key)
  agent.policy(images(3), np.ones(3, bool), None, False)  # Another batch size: its own graph.
  agent.policy(images(2), np.ones(2, bool), None, True)  # Training mode: its own graph.
  assert agent._policy.experimental_get_tracing_count() == 3


@pytest.mark.parametrize('argv, jit', [([], True), (['--jit_policy', 'False'], False),
                                       (['--behavior', 'cem', '--cem_candidates', '8', '--cem_topk', '2'], False)])
def test_policy_is_compiled_with_xla_for_the_float32_actor_only(argv, jit):
  agent = make_agent(*argv)
  assert agent.policy_xla == jit and agent._policy._jit_compile == jit
  assert agent.policy_xla_possible == ('cem' not in argv)  # float32 on one device: only CEM rules it out here.
  action, _ = agent.policy(images(2), np.ones(2, bool), None, True)
  assert action.shape == (2, 3) and np.all(np.abs(action) <= 1)


@pytest.mark.parametrize('precision, jit', [('mixed_bfloat16', True), ('mixed_float16', False)])
def test_the_bfloat16_actor_is_compiled_too_the_float16_one_not(precision, jit):
  config = dreamer.parse_args(['--preset', 'debug'])
  agent = dreamer.Dreamer(config, BOX, precision=precision)
  assert agent.policy_xla == jit and agent._policy._jit_compile == jit
  state = None
  for step in range(3):
    action, state = agent.policy(images(2, step), np.array([step == 0] * 2), state, True)
    assert action.shape == (2, 3) and action.dtype == np.float32 and np.all(np.abs(action) <= 1)
  # The recurrent state stays in the acting dtype: float32 under bfloat16 (test_precision.py), else the compute one.
  assert state[0]['deter'].dtype == {'mixed_bfloat16': 'float32', 'mixed_float16': 'float16'}[precision]


# Reward clipping ----------------------------------------------------------------------------------------------------

def test_preprocess_applies_tanh_to_the_reward_only():
  rng = np.random.RandomState(0)
  obs = dict(image=rng.randint(0, 256, (2, 3, 8, 8, 3)).astype(np.uint8),
             action=rng.uniform(-3, 3, (2, 3, 4)).astype(np.float32),
             reward=rng.normal(0, 3, (2, 3)).astype(np.float16),
             discount=rng.randint(0, 2, (2, 3)).astype(np.float32),
             velocity=rng.normal(0, 3, (2, 3, 5)))
  for clip, expected in (('tanh', np.tanh(obs['reward'].astype(np.float32))), ('none', obs['reward'])):
    config = dreamer.parse_args(['--clip_rewards', clip])
    out = dreamer.preprocess({k: tf.constant(v) for k, v in obs.items()}, config)
    out = {k: v.numpy() for k, v in out.items()}
    assert set(out) == set(obs) and all(v.dtype == np.float32 for v in out.values()), clip
    np.testing.assert_allclose(out['reward'], expected, rtol=1e-6, err_msg=clip)
    np.testing.assert_allclose(out['image'], obs['image'] / 255 - 0.5, atol=1e-7)
    for key in ('action', 'discount', 'velocity'):
      np.testing.assert_array_equal(out[key], obs[key].astype(np.float32), err_msg=(clip, key))


@pytest.mark.parametrize('clip', ['tanh', 'none'])
def test_dataset_windows_are_raw_and_preprocess_clips_their_rewards(tmp_path, clip):
  rng = np.random.RandomState(0)
  length = 40
  episode = dict(image=rng.randint(0, 256, (length, 64, 64, 3)).astype(np.uint8),
                 action=np.stack([np.arange(length) / 64, rng.uniform(-1, 1, length)], -1).astype(np.float32),
                 reward=rng.normal(0, 3, length).astype(np.float16), discount=np.ones(length, np.float16))
  tools.save_episodes(tmp_path, [episode])
  config = dreamer.parse_args(['--preset', 'debug', '--clip_rewards', clip, '--logdir', str(tmp_path)])
  raw = next(iter(dreamer.load_dataset(tmp_path, config)))
  assert raw['image'].dtype == tf.uint8  # The pipeline keeps the stored values; the train step preprocesses.
  data = dreamer.preprocess(raw, config)
  B, T = config.batch_size, config.batch_length
  assert data['reward'].shape == (B, T) and data['reward'].dtype == tf.float32
  clipped = np.tanh if clip == 'tanh' else lambda x: x
  for b in range(B):
    start = int(round(float(data['action'][b, 0, 0]) * 64))  # The window's place in the episode.
    window = slice(start, start + T)
    np.testing.assert_array_equal(data['action'][b], episode['action'][window])
    np.testing.assert_allclose(data['reward'][b], clipped(episode['reward'][window].astype(np.float32)), rtol=1e-6)
    np.testing.assert_array_equal(data['discount'][b], episode['discount'][window].astype(np.float32))
  assert np.abs(episode['reward']).max() > 3  # Clipping changes the rewards of this episode.


# Episode summaries --------------------------------------------------------------------------------------------------

def stored_episode(length, seed):
  rng = np.random.RandomState(seed)
  return dict(image=rng.randint(0, 256, (length, 64, 64, 3)).astype(np.uint8),
              action=rng.uniform(-1, 1, (length, 6)).astype(np.float16),
              reward=rng.uniform(0, 1, length).astype(np.float16), discount=np.ones(length, np.float16))


def read_events(logdir):
  """{tag: [(step, value)]} of the scalars, and the set of all tags, in the event files of a logdir."""
  scalars, tags = {}, set()
  for path in logdir.glob('events.out.tfevents.*'):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for value in event.summary.value:
        tags.add(value.tag)
        if value.HasField('tensor') and not value.tensor.string_val:
          scalars.setdefault(value.tag, []).append((event.step, float(tf.make_ndarray(value.tensor))))
  return scalars, tags


def test_episode_summaries_write_the_metrics_line_and_print(tmp_path, capsys):
  config = dreamer.parse_args(['--logdir', str(tmp_path), '--action_repeat', '2'])
  datadir = tmp_path / 'episodes'
  episodes = [stored_episode(n, seed) for seed, n in enumerate([11, 21, 6])]
  tools.save_episodes(datadir, episodes)
  writer = tf.summary.create_file_writer(str(tmp_path))
  counter = loop.Counter(datadir, config.action_repeat)  # Reads the episodes on disk once.
  logger = loop.Logger(tmp_path, writer, config.steps)
  episode = episodes[1]
  ret = float(np.sum(episode['reward'].astype(np.float64)))
  logger.episode(episode, 'train', counter)
  # The step is the environment steps stored on disk: (10 + 20 + 5) transitions x action repeat 2.
  lines = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert lines == [{'step': 70, 'train/return': pytest.approx(ret, rel=1e-12), 'train/length': 20, 'episodes': 3}]
  assert capsys.readouterr().out == f'Train episode of length 40 with return {ret:.1f}.\n'
  # A test episode is not stored: the counts are those on disk, which now hold one more (saved by the loop).
  saved = stored_episode(9, 3)
  tools.save_episodes(datadir, [saved])
  counter.add_episode(saved)
  assert (counter.episodes, counter.stored) == (4, 2 * tools.count_episodes(datadir)[1])
  test = stored_episode(5, 4)
  test_ret = float(np.sum(test['reward'].astype(np.float64)))
  logger.episode(test, 'test', counter)
  line = json.loads((tmp_path / 'metrics.jsonl').read_text().splitlines()[1])
  assert line == {'step': 86, 'test/return': pytest.approx(test_ret, rel=1e-12), 'test/length': 4, 'episodes': 4}
  assert capsys.readouterr().out == f'Test episode of length 8 with return {test_ret:.1f}.\n'
  # The progress line of the next scalar log shows the latest returns.
  logger.train_metrics(100, [('model_loss', 1.0)])
  out = capsys.readouterr().out
  assert f'train/return {ret:.1f}' in out and f'test/return {test_ret:.1f}' in out and 'step 100/' in out, out
  writer.flush()
  scalars, tags = read_events(tmp_path)
  assert scalars['sim/train/return'] == [(70, pytest.approx(ret, rel=1e-6))]
  assert scalars['sim/train/length'] == [(70, 20)] and scalars['sim/test/length'] == [(86, 4)]
  assert scalars['sim/episodes'] == [(70, 3), (86, 4)]
  assert scalars['agent/model_loss'] == [(100, 1.0)]
  assert 'sim/test/video/gif' in tags and not any(tag.startswith('sim/train/video') for tag in tags)
