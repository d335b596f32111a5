"""Checks the port against references the original code wrote.

Two kinds of reference folders (tests/data/reference/ and tests/data/train_step/; its README gives the protocol):
- forward outputs: `variables.pkl`, `config.json` and `refs.npz` (fixed inputs `in/*` and the reference networks'
  deterministic outputs `out/*`). The port loads the checkpoint and recomputes every `out/*` array.
- one train step: `refs_train.npz` (a batch `in/batch_*` and the original's noise-free train step on it: metrics,
  each optimizer's gradients before clipping, the update of every variable, intermediates), `config.json` (or
  `variables.json`) and the checkpoint it started from (`variables.pkl` in the folder, the `checkpoint` entry of
  `config.json`, or `../../checkpoints/<folder name>/variables.pkl`). The port makes the same step, noise-free.

Prints, per output, the largest difference in the units of its tolerance, the tolerance, and ok/FAIL. Exit code 0
when every output is within tolerance, 1 when one is not or the folder holds no outputs, 2 on bad input.

  python compare.py DIR [DIR ...]
"""

import argparse
import collections
import json
import pathlib
import sys

sys.path.append(str(pathlib.Path(__file__).parent))

import runtime

runtime.configure()  # Before TensorFlow is imported (oneDNN as in training; see runtime.py).

import numpy as np
import tensorflow as tf
from gymnasium import spaces
from tensorflow_probability import distributions as tfd

import dreamer
import flags
import tools

TOLERANCE = 1e-5  # Forward outputs: absolute, or relative to the reference value where that is larger than 1.

# A compared output: `diff` is the largest difference in the units of `tolerance` (see `measure`).
Row = collections.namedtuple('Row', 'name diff tolerance ok measure')


def load_config(data):
  """The port's config from a reference config dict (the flags the original ran with), in float32."""
  data = data.get('config', data)
  config = dreamer.define_config()
  for key, value in data.items():
    if key in config and key != 'logdir':
      config[key] = type(config[key])(value) if not isinstance(config[key], bool) else bool(value)
  config.precision = 32  # Compare in float32, as the references were written.
  return config


def build_agent(config, actdim, checkpoint):
  """A float32 agent (config.precision 32) for `config` with fresh optimizers, loaded from `checkpoint`."""
  actspace = spaces.Discrete(actdim) if config.action_dist in flags.ONEHOT else spaces.Box(-1, 1, (actdim,))
  agent = dreamer.Dreamer(config, actspace)
  agent.load(checkpoint)
  return agent


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
  dist = agent._actor(feat)
  if config.action_dist == 'tanh_normal':
    # The port's own distribution: SampleDist(Independent(TransformedDistribution(Normal, TanhBijector))).
    transformed = dist.distribution
    out['actor_normal_loc'] = transformed.distribution.loc
    out['actor_normal_scale'] = transformed.distribution.scale
    out['actor_tanh_loc'] = transformed.bijector.forward(transformed.distribution.loc)
    out['actor_logprob'] = dist.log_prob(inp('logprob_actions'))
  else:
    out['actor_logits'] = dist.logits_parameter()
    out['actor_probs'] = dist.mean()
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


def max_diff(actual, expected, scale):
  """Largest abs(actual - expected) / scale; inf when the port did not compute the array or its shape differs."""
  if actual is None or np.shape(actual) != np.shape(expected):
    return np.inf
  diff = np.abs(np.asarray(actual, np.float64) - np.asarray(expected, np.float64)) / scale
  return float(diff.max(initial=0))


def run_forward(directory):
  """(refs, outputs): the folder's refs.npz and the port's outputs of its checkpoint on the same inputs."""
  for name in ('variables.pkl', 'config.json'):
    if not (directory / name).exists():
      raise tools.CheckpointError(f'{directory} has no {name}; a forward-output folder needs variables.pkl, '
                                  'config.json and refs.npz.')
  refs = dict(np.load(directory / 'refs.npz'))
  config = load_config(json.loads((directory / 'config.json').read_text()))
  config.logdir = directory
  agent = build_agent(config, refs['in/prev_action'].shape[-1], directory / 'variables.pkl')
  return refs, compute_outputs(agent, config, refs)


def forward_rows(refs, ours):
  """Rows comparing the port's forward outputs (see run_forward) with every out/* array of the reference's."""
  rows = []
  for name in sorted(k for k in refs if k.startswith('out/')):
    expected = refs[name].astype(np.float64)
    diff = max_diff(ours.get(name), expected, np.maximum(1.0, np.abs(expected)))
    rows.append(Row(name, diff, TOLERANCE, diff <= TOLERANCE, 'abs/max(1,|ref|)'))
  return rows


def compare_forward(directory):
  """Rows for every out/* array of the directory's refs.npz."""
  return forward_rows(*run_forward(directory))


# Train-step tolerances, from tests/data/train_step/README.md (15-25x the reference's own spread between
# oneDNN on and off, one thread and two).
METRIC_TOLERANCE = 1e-5  # abs diff <= 1e-5 * max(1, abs(ref)); grad norms: 1e-4 relative.
NORM_TOLERANCE = 1e-4
GRAD_TOLERANCE = 1e-4  # Per array: max abs diff <= 1e-4 * max abs(ref); an all-zero reference: exactly zero.
INTER_TOLERANCE = 1e-4  # Per array, as the gradients.
UPDATE_TOLERANCE = 1e-2  # abs diff <= 1e-2 * lr of the variable's optimizer ...
UPDATE_FRACTION = 0.999  # ... on at least this fraction of its elements (near-zero gradients may flip sign).
OPTIMIZERS = ('model', 'actor', 'value')


def train_step_files(directory):
  """(refs, config dict, checkpoint path) of a train-step folder, with the README's fallbacks."""
  refs = dict(np.load(directory / 'refs_train.npz'))
  if (directory / 'config.json').exists():
    data = json.loads((directory / 'config.json').read_text())
  elif (directory / 'variables.json').exists():
    data = json.loads((directory / 'variables.json').read_text())
  else:
    raise tools.CheckpointError(f'{directory} has refs_train.npz but no config.json (or variables.json) to say '
                                'which config made it.')
  candidates = [directory / 'variables.pkl']
  if data.get('checkpoint'):
    candidates.append(directory / data['checkpoint'])
  candidates.append(directory.parent.parent / 'checkpoints' / directory.name / 'variables.pkl')
  checkpoint = next((c for c in candidates if c.exists()), None)
  if checkpoint is None:
    raise tools.CheckpointError(f'{directory} has no variables.pkl; looked for ' +
                                ', '.join(str(c) for c in candidates) + '.')
  return refs, data, checkpoint


def run_train_step(directory):
  """The port's noise-free train step on a folder's batch, from its checkpoint with fresh optimizers (Adam's first
  step). Returns (refs, outputs, lrs, trained): outputs maps `out/*` names to the port's arrays, its gradients and
  updates keyed by the variable's index in variables.pkl (`out/grad/<opt>/<pkl index>`, `out/update/<pkl index>`);
  lrs the optimizers' learning rates; trained the pkl indices each optimizer updates."""
  refs, data, checkpoint = train_step_files(directory)
  config = load_config(data)
  config.logdir = directory
  agent = build_agent(config, refs['in/batch_action'].shape[-1], checkpoint)
  table = agent.checkpoint_table()
  index = {id(var): k for k, (_, var) in enumerate(table)}
  before = [np.array(var.numpy()) for _, var in table]
  batch = {k: tf.constant(refs[f'in/batch_{k}']) for k in ('image', 'action', 'reward', 'discount')}
  result = agent.train_probe(batch)
  out = {}
  for name, value in result.items():
    if name.startswith('grad/'):
      _, opt, i = name.split('/')
      var = getattr(agent, f'_{opt}_opt').variables[int(i)]
      out[f'out/grad/{opt}/{index[id(var)]}'] = value.numpy()
    elif name.startswith('inter/'):
      out[f'out/{name}'] = value.numpy()
    else:
      out[f'out/metrics/{name}'] = float(np.mean(value.numpy()))
  for k, (_, var) in enumerate(table):
    out[f'out/update/{k}'] = var.numpy() - before[k]
  lrs = {opt: float(config[f'{opt}_lr']) for opt in OPTIMIZERS}
  trained = {opt: {index[id(v)] for v in getattr(agent, f'_{opt}_opt').variables} for opt in OPTIMIZERS}
  return refs, out, lrs, trained


def compare_train_step(directory):
  """Rows for every out/* array of the directory's refs_train.npz."""
  with np.load(directory / 'refs_train.npz') as refs:  # Only the names: run_train_step reads the arrays.
    if not any(k.startswith('out/') for k in refs.files):
      return []  # Nothing to compare: no need to run the step.
  return train_step_rows(*run_train_step(directory))


def train_step_rows(refs, ours, lrs, trained):
  """Rows comparing the port's outputs of one train step (see run_train_step) with the reference's."""
  rows = []
  for name in sorted(k for k in refs if k.startswith('out/metrics/')):
    expected = float(refs[name])
    if name.endswith('_grad_norm'):
      diff = max_diff(ours.get(name), expected, abs(expected))
      rows.append(Row(name, diff, NORM_TOLERANCE, diff <= NORM_TOLERANCE, 'rel'))
    else:
      diff = max_diff(ours.get(name), expected, max(1.0, abs(expected)))
      rows.append(Row(name, diff, METRIC_TOLERANCE, diff <= METRIC_TOLERANCE, 'abs/max(1,|ref|)'))
  for opt in OPTIMIZERS:
    pkl_index = [int(k) for k in refs[f'meta/{opt}_pkl_index']]
    if set(pkl_index) != trained[opt]:  # The port's optimizer must hold the same variables.
      rows.append(Row(f'variables of the {opt} optimizer', np.inf, 0, False,
                      f'port {sorted(trained[opt])} vs reference {sorted(pkl_index)}'))
    for i, k in enumerate(pkl_index):
      if f'out/grad/{opt}/{i}' not in refs:
        continue
      expected = refs[f'out/grad/{opt}/{i}']
      actual = ours.get(f'out/grad/{opt}/{k}')
      scale = np.abs(expected).max()
      if scale == 0:  # No gradient in the reference: none in the port either.
        diff = max_diff(actual, expected, 1.0)
        rows.append(Row(f'out/grad/{opt}/{i}', diff, 0.0, diff == 0, 'abs (reference all zero)'))
      else:
        diff = max_diff(actual, expected, scale)
        rows.append(Row(f'out/grad/{opt}/{i}', diff, GRAD_TOLERANCE, diff <= GRAD_TOLERANCE, 'abs/max|ref|'))
    for k in (k for k in pkl_index if f'out/update/{k}' in refs):
      expected = refs[f'out/update/{k}'].astype(np.float64)
      actual = ours[f'out/update/{k}']
      diff = np.abs(actual - expected) / lrs[opt]
      within = float(np.mean(diff <= UPDATE_TOLERANCE))
      rows.append(Row(f'out/update/{k}', float(diff.max(initial=0)), UPDATE_TOLERANCE, within >= UPDATE_FRACTION,
                      f'abs/lr ({opt}), {100 * within:.2f}% within'))
  for name in sorted(k for k in refs if k.startswith('out/inter/')):
    expected = refs[name]
    diff = max_diff(ours.get(name), expected, np.abs(expected).max())
    rows.append(Row(name, diff, INTER_TOLERANCE, diff <= INTER_TOLERANCE, 'abs/max|ref|'))
  return rows


def compare(directory, verbose=True):
  """Rows for every output of a reference folder (forward outputs, a train step, or both)."""
  directory = pathlib.Path(directory)
  kinds = [(name, fn) for name, fn in (('refs.npz', compare_forward), ('refs_train.npz', compare_train_step))
           if (directory / name).exists()]
  if not kinds:
    raise tools.CheckpointError(f'{directory} holds neither refs.npz (forward outputs) nor refs_train.npz (a '
                                'train step); see compare.py --help.')
  rows = [row for _, fn in kinds for row in fn(directory)]
  if verbose:
    print(f'{directory}:')
    for row in rows:
      note = '' if row.ok else ('  <- not computed by the port' if row.diff == np.inf else '  <- exceeds tolerance')
      print(f'  {row.name:32s} {row.diff:10.3g}  tolerance {row.tolerance:7.0e} {row.measure:28s} '
            f'{"ok" if row.ok else "FAIL"}{note}')
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('directories', nargs='+', type=pathlib.Path)
  args = parser.parse_args(argv)
  failed = []
  for directory in args.directories:
    try:
      rows = compare(directory)
    except tools.CheckpointError as e:
      print(f'Error: {e}', file=sys.stderr)
      return 2
    if not rows:
      print(f'{directory}: the reference file holds no out/* arrays; nothing was compared.')
    bad = [row.name for row in rows if not row.ok]
    if bad or not rows:
      failed.append(f'{directory} ({len(bad)} of {len(rows)} outputs)' if rows else f'{directory} (no outputs)')
  if failed:
    print('FAILED: ' + '; '.join(failed) + '.')
    return 1
  print('All outputs match the reference.')
  return 0


if __name__ == '__main__':
  sys.exit(main())
