"""What the actor learns in the first updates of a run, and from what: the pretraining round replayed on a run's
first episodes, with probes of the policy and of the imagined returns.

A fresh agent (the run's flags from its config.json, overridden by the flags after `--`) trains --updates steps on
the first --episodes episode files of --logdir (by default the prefill: 5 episodes of 1,000 env steps) exactly as
the pretraining round does (replay sampling, train-step seeds). Every --every updates, on one fixed batch of those
episodes, it records:
- `action_mean`, `action_below0`: the actor's deterministic action tanh(mean) over the batch's posterior states
  (its mean, and the fraction below 0), and `std`: the mean pre-tanh std;
- `reward_sum_<a>`, `value_<a>`: for each constant action a in -1, 0, 1 (the same in every dimension), imagined
  from the same states for --horizon steps: the predicted rewards summed and the value of the last state (means
  over the states).
Written as probe.jsonl in --outdir, one line per probe, and printed. On a sparse task with no reward in the replay
the rewards predicted on imagined states are the reward head's extrapolation; when they rank the constant actions
the same way probe after probe, the actor follows them to a bound (docs/reproduction.md: pendulum swingup).

  python probe.py --logdir ../campaigns/reproduction/dmc_pendulum_swingup/dreamer_cpu/0 --outdir /tmp/probe
  python probe.py --logdir RUN --outdir OUT --updates 100 --every 10 -- --seed 1   # other initial weights
"""

import argparse
import json
import pathlib
import shutil
import sys
import tempfile

sys.path.append(str(pathlib.Path(__file__).parent))

import runtime

runtime.configure()  # Before TensorFlow is imported (oneDNN as in training; see runtime.py).

import keras
import numpy as np
import tensorflow as tf
from gymnasium import spaces

import dreamer
import flags
import seeds
import tools

ACTIONS = (-1.0, 0.0, 1.0)


def run_flags(logdir, extra):
  """The run's flags (its config.json, as dreamer.py wrote it) with `extra` (a list of command-line flags) over
  them."""
  path = logdir / 'config.json'
  if not path.exists():
    raise flags.UserError(f'--logdir {logdir} has no config.json: give the folder of a run dreamer.py started.')
  saved = json.loads(path.read_text())
  names = {flag.name for flag in flags.FLAGS} - {'logdir', 'preset'}
  argv = [f'--{k}={v}' for k, v in saved.items() if k in names]
  return flags.parse_args(argv + list(extra))


def first_episodes(logdir, count, directory):
  """Copies the run's first `count` episode files (by name: they start with their time) to `directory`."""
  files = sorted((logdir / 'episodes').glob('*.npz'))
  if len(files) < count:
    raise flags.UserError(f'--episodes {count}: {logdir / "episodes"} holds {len(files)} episode files.')
  for file in files[:count]:
    shutil.copy(file, directory)


def probe(agent, config, batch, update):
  """One row of probes on `batch` (stored episodes' windows, as the dataset yields them)."""
  data = dreamer.preprocess(batch, config)
  embed = agent._encode(data)
  post, _ = agent._dynamics.observe(embed, data['action'], seed=tf.constant([0, 1], tf.int64))
  start = {k: tf.reshape(v, [-1] + list(v.shape[2:])) for k, v in post.items()}  # [B*T, ...]
  normal = agent._actor(agent._dynamics.get_feat(start))._dist.distribution.distribution
  action = tf.tanh(normal.loc).numpy()
  row = dict(update=update, action_mean=float(action.mean()), action_below0=float((action < 0).mean()),
             std=float(normal.scale.numpy().mean()))
  for a in ACTIONS:
    const = tf.fill([action.shape[0], config.horizon, agent._actdim], a)
    feat = agent._dynamics.get_feat(agent._dynamics.imagine(const, start, tf.constant([0, 2], tf.int64)))  # [N, H, F]
    row[f'reward_sum_{a:+g}'] = float(tf.reduce_mean(tf.reduce_sum(agent._reward(feat).mode(), 1)))
    row[f'value_{a:+g}'] = float(tf.reduce_mean(agent._value(feat[:, -1]).mode()))
  return row


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--logdir', type=pathlib.Path, required=True, help='a run folder (config.json, episodes/)')
  parser.add_argument('--outdir', type=pathlib.Path, required=True)
  parser.add_argument('--episodes', type=int, default=5, help='the first episode files to train on')
  parser.add_argument('--updates', type=int, default=100, help='train steps (0: only the probe of the fresh agent)')
  parser.add_argument('--every', type=int, default=10, help='updates between probes')
  parser.add_argument('extra', nargs='*', help='dreamer.py flags over the run\'s, after --')
  args = parser.parse_args(argv)
  for name, least in (('episodes', 1), ('updates', 0), ('every', 1)):
    if getattr(args, name) < least:
      parser.error(f'--{name} must be at least {least}, got {getattr(args, name)}')
  try:
    config = run_flags(args.logdir.expanduser(), args.extra)
    flags.check_config(config)
    if not dreamer.has_actor(config) or not dreamer.has_value(config):
      raise flags.UserError(f'--behavior {config.behavior} --value_estimate {config.value_estimate}: the probe '
                            'reads an actor and a value network.')
    with tempfile.TemporaryDirectory() as directory:
      first_episodes(args.logdir.expanduser(), args.episodes, directory)
      rows = replay(config, directory, args.updates, args.every)
  except (flags.UserError, tools.NoEpisodesError) as e:
    print(f'Error: {e}', file=sys.stderr)
    return 2
  args.outdir.mkdir(parents=True, exist_ok=True)
  tools.write_atomic(args.outdir / 'probe.jsonl', ''.join(json.dumps(row) + '\n' for row in rows).encode())
  print(f'Wrote {args.outdir / "probe.jsonl"}.')
  return 0


def replay(config, directory, updates, every):
  """Trains a fresh agent `updates` steps on the episodes in `directory`, probing every `every` (and at 0)."""
  keras.utils.set_random_seed(config.seed)  # The initial weights, as dreamer.setup sets them.
  dataset = iter(dreamer.load_dataset(directory, config))
  batch = next(iter(dreamer.load_dataset(directory, config, seed=config.seed + 1)))  # Fixed, apart from training's.
  agent = dreamer.Dreamer(config, spaces.Box(-1, 1, batch['action'].shape[-1:], np.float32))
  rows = []
  for update in range(updates + 1):
    if update:
      agent.train(next(dataset), seeds.train_step(config.seed, seeds.first_update(0) + update))
    if update % every == 0:
      rows.append(probe(agent, config, batch, update))
      print(' '.join(f'{k} {v:+.4f}' if isinstance(v, float) else f'{k} {v}' for k, v in rows[-1].items()),
            flush=True)
  return rows


if __name__ == '__main__':
  sys.exit(main())
