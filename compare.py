"""Checks the port against a checkpoint the original code wrote.

A checkpoint directory holds `variables.pkl`, `config.json` and `refs.npz` (fixed inputs `in/*` and the reference
networks' deterministic outputs `out/*`, see ../shared/reference/checkpoints/README.md). This loads the checkpoint
into the port, recomputes every `out/*` array from the `in/*` arrays and prints the largest absolute and relative
difference per output. Exit code 0 when every output is within tolerance, 1 when one is not, 2 on bad input.

  python compare.py DIR [DIR ...]
"""

import argparse
import json
import os
import pathlib
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import numpy as np
import tensorflow as tf
from gymnasium import spaces
from tensorflow_probability import distributions as tfd

sys.path.append(str(pathlib.Path(__file__).parent))

import dreamer
import tools

TOLERANCE = 1e-5  # Absolute, or relative to the reference value where that is larger than 1.


def load_config(directory):
  data = json.loads((directory / 'config.json').read_text())
  data = data.get('config', data)
  config = dreamer.define_config()
  for key, value in data.items():
    if key in config and key != 'logdir':
      config[key] = type(config[key])(value) if not isinstance(config[key], bool) else bool(value)
  config.precision = 32  # Compare in float32, as the references were written.
  return config


def build_agent(directory, refs):
  config = load_config(directory)
  config.logdir = directory
  import keras
  keras.mixed_precision.set_global_policy('float32')
  actdim = refs['in/prev_action'].shape[-1]
  actspace = spaces.Discrete(actdim) if config.action_dist in dreamer.ONEHOT else spaces.Box(-1, 1, (actdim,))
  agent = dreamer.Dreamer(config, None, actspace)
  agent.load(directory / 'variables.pkl')
  return agent, config


def compute_outputs(agent, config, refs):
  """Every deterministic output the reference saved, recomputed by the port from the same inputs."""
  inp = lambda name: tf.constant(refs[f'in/{name}'])
  out = {}
  image = tf.cast(inp('image_uint8'), tf.float32) / 255.0 - 0.5
  out['image_preprocessed'] = dreamer.preprocess({'image': inp('image_uint8')}, config)['image']
  out['embed'] = agent._encode({'image': image})
  prev = dict(stoch=inp('prev_stoch'), deter=inp('prev_deter'))
  prev['mean'] = prev['std'] = tf.zeros_like(prev['stoch'])
  prior = agent._dynamics.img_step(prev, inp('prev_action'))
  for key in ('mean', 'std', 'deter'):
    out[f'img_step_{key}'] = prior[key]
  post, prior = agent._dynamics.obs_step(prev, inp('prev_action'), inp('embed_step'))
  for key in ('mean', 'std', 'deter'):
    out[f'obs_step_post_{key}'] = post[key]
    out[f'obs_step_prior_{key}'] = prior[key]
  out['kl_post_prior'] = tfd.kl_divergence(agent._dynamics.get_dist(post), agent._dynamics.get_dist(prior))
  feat = inp('feat')
  decoded = agent._decode(feat)
  out['decoder_mean'] = decoded.mean()
  n = feat.shape[0]
  out['decoder_logprob_of_images'] = decoded.log_prob(tf.reshape(image, (-1, 64, 64, 3))[:n])
  reward = agent._reward(feat)
  out['reward_mode'] = reward.mode()
  if 'in/reward_targets' in refs:
    out['reward_logprob'] = reward.log_prob(inp('reward_targets'))
  out['value_mode'] = agent._value(feat).mode()
  if config.pcont:
    pcont = agent._pcont(feat)
    out['pcont_logits'] = pcont.distribution.logits
    out['pcont_mean'] = pcont.mean()
    out['pcont_logprob_of_discount'] = pcont.log_prob(config.discount * tf.ones(n))
  x = feat
  for layer in agent._actor.dense_layers:
    x = layer(x)
  out['actor_hout_raw'] = x
  if config.action_dist == 'tanh_normal':
    size = x.shape[-1] // 2
    loc = 5 * tf.tanh(x[:, :size] / 5)
    out['actor_normal_loc'] = loc
    out['actor_normal_scale'] = tf.nn.softplus(x[:, size:] + np.log(np.exp(config.action_init_std) - 1)) + 1e-4
    out['actor_tanh_loc'] = tf.tanh(loc)
    out['actor_logprob'] = agent._actor(feat).log_prob(inp('logprob_actions'))
  else:
    out['actor_logits'] = x
    out['actor_probs'] = tf.nn.softmax(x)
  if 'in/lr_reward' in refs:
    lam = float(refs['in/lr_lambda'])
    args = inp('lr_reward'), inp('lr_value'), inp('lr_pcont'), inp('lr_bootstrap')
    out['lambda_return'] = tools.lambda_return(*args, lambda_=lam, axis=0)
    out['lambda_return_scalar_pcont'] = tools.lambda_return(
        args[0], args[1], float(refs['in/lr_discount']), args[3], lambda_=lam, axis=0)
    transpose = lambda t: tf.transpose(t)
    out['lambda_return_axis1'] = tools.lambda_return(
        transpose(args[0]), transpose(args[1]), transpose(args[2]), args[3], lambda_=lam, axis=1)
    out['lambda_return_no_bootstrap'] = tools.lambda_return(*args[:3], None, lambda_=lam, axis=0)
  return {f'out/{k}': np.asarray(v) for k, v in out.items()}


def compare(directory, verbose=True):
  """Returns a list of (name, max_abs, max_rel, ok) for every out/* array of the directory's refs.npz."""
  directory = pathlib.Path(directory)
  for name in ('variables.pkl', 'config.json', 'refs.npz'):
    if not (directory / name).exists():
      raise tools.CheckpointError(f'{directory} has no {name}; a checkpoint directory needs variables.pkl, '
                                  'config.json and refs.npz.')
  refs = dict(np.load(directory / 'refs.npz'))
  agent, config = build_agent(directory, refs)
  ours = compute_outputs(agent, config, refs)
  rows = []
  for name in sorted(k for k in refs if k.startswith('out/')):
    expected = refs[name].astype(np.float64)
    if name not in ours:
      rows.append((name, np.inf, np.inf, False))
      continue
    actual = ours[name].astype(np.float64)
    if actual.shape != expected.shape:
      rows.append((name, np.inf, np.inf, False))
      continue
    diff = np.abs(actual - expected)
    rel = diff / np.maximum(np.abs(expected), 1e-12)
    ok = bool(np.all(diff <= TOLERANCE * np.maximum(1.0, np.abs(expected))))
    rows.append((name, float(diff.max(initial=0)), float(rel.max(initial=0)), ok))
  if verbose:
    print(f'{directory}:')
    for name, absolute, relative, ok in rows:
      note = '' if ok else ('  <- not computed by the port' if absolute == np.inf else '  <- exceeds tolerance')
      print(f'  {name:40s} max abs {absolute:10.3g}  max rel {relative:10.3g}  {"ok" if ok else "FAIL"}{note}')
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('directories', nargs='+', type=pathlib.Path)
  args = parser.parse_args(argv)
  failed = False
  for directory in args.directories:
    try:
      rows = compare(directory)
    except tools.CheckpointError as e:
      print(f'Error: {e}', file=sys.stderr)
      return 2
    failed |= not all(ok for *_, ok in rows)
  print('FAILED: outputs differ from the reference.' if failed else 'All outputs match the reference.')
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
