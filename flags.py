"""The flags: one typed table from which the defaults (`define_config`), the parser and `--help`, the checks, the
resume rule and the README's flags table are derived. No TensorFlow here, so `--help` and flag errors answer at once.

Each `Flag` has the reference's default. `python flags.py --readme` rewrites the README's flags table from it
(tests/test_flags.py fails when the two differ).
"""

import argparse
import dataclasses
import json
import pathlib
import sys

import numpy as np

import wrappers


class UserError(Exception):
  """A mistake in the user's input; reported as one message with exit code 2, no traceback."""


class AttrDict(dict):

  __setattr__ = dict.__setitem__

  def __getattr__(self, name):
    try:
      return self[name]
    except KeyError:
      raise AttributeError(name) from None


@dataclasses.dataclass(frozen=True)
class Flag:
  name: str
  default: object
  help: str
  choices: tuple = ()
  minimum: float = None  # Smallest allowed value (inclusive).
  positive: bool = False  # Must be > 0.
  fixed: bool = False  # Changes the networks' shapes, the stored episodes or the step count: fixed on resume.
  shown: str = None  # The default as the README shows it, where str(default) reads badly (5000000 -> 5e6).


ACTS = ('elu', 'relu', 'swish', 'leaky_relu')  # models.ACTS has the functions (tested to agree).
ONEHOT = ('onehot', 'onehot_score')  # The same actor outputs, different gradients (straight-through or score).

FLAGS = (
    # General.
    Flag('logdir', pathlib.Path('.'), 'run folder (episodes, metrics, checkpoint); `~` is expanded'),
    Flag('seed', 0, "seeds numpy, TF, the environments, the random prefill policy, the replay sampler, the train "
         "step's and acting's draws (seeds.py)"),
    Flag('steps', int(5e6), 'environment steps to train for', positive=True, shown='5e6'),
    Flag('eval_every', int(1e4), 'environment steps collected between evaluations (and checkpoints)',
         positive=True, shown='1e4'),
    Flag('log_every', int(1e3), 'environment steps between metric logs', positive=True, shown='1e3'),
    Flag('log_scalars', True, 'write training scalars (with False the checkpoint has one metric)', fixed=True),
    Flag('log_images', True, 'write the `agent/openl` video'),
    Flag('video_every', int(1e4), 'environment steps between videos: the `agent/openl` video at the next training '
         'round, the test video at the next evaluation (the reference: every log and every evaluation)',
         positive=True, shown='1e4'),
    Flag('video_frames', 500, 'at most this many frames (agent steps) of a test episode in its video: a whole '
         'DMC episode, the first 2000 frames of an Atari game', positive=True),
    Flag('gpu_growth', True, 'let TF grow GPU memory instead of taking it all'),
    Flag('precision', 16, '16: mixed precision (float16 with loss scaling on a GPU; bfloat16 on a CPU that has it, '
         'else float32); 32: float32', choices=(16, 32)),
    Flag('jit_policy', True, "compile the actor's policy step with XLA when it computes in float32 or bfloat16 on "
         'one device (one fused program instead of ~100 small ops; docs/speed.md; its random draws differ from the '
         'plain graph\'s)'),
    Flag('checkpoint', '', "a `variables.pkl` to load instead of the logdir's", shown='(none)'),
    Flag('eval_only', False, 'only evaluate the loaded checkpoint for `--eval_episodes` episodes; writes '
         '`eval.json`'),
    Flag('eval_episodes', 10, 'episodes of `--eval_only`', positive=True),
    Flag('benchmark', False, 'only measure speed on this machine and write `benchmark.json`'),
    Flag('distribute', 'auto', '`none`, `mirrored` (all local GPUs, or all logical CPUs), `multi_worker` (hosts '
         'from `TF_CONFIG`); `auto`: multi_worker if `TF_CONFIG` is set, mirrored with several GPUs, else none',
         choices=('auto', 'none', 'mirrored', 'multi_worker')),
    Flag('cpu_devices', 0, 'split the CPU into this many logical devices (to try `--distribute mirrored` without '
         'GPUs); 0: one device', minimum=0),
    Flag('intra_op_threads', 0, 'threads one TensorFlow op may use; 0: TensorFlow\'s choice (all cores). At 1 '
         'each op runs single-threaded, as many at a time as there are cores: faster for small networks (the `cpu` '
         'preset sets it; docs/speed.md)', minimum=0),
    # Environment.
    Flag('task', 'dmc_walker_walk', '`dmc_<domain>_<task>` (domain `cup` = `ball_in_cup`), `atari_<game>` '
         '(e.g. `atari_pong`) or `gym_<id>` (any Gymnasium id, e.g. `gym_HalfCheetah-v5`)', fixed=True),
    Flag('envs', 1, 'environments stepped in parallel', positive=True),
    Flag('parallel', 'none', 'none: step the envs one after another; thread/process: step them concurrently '
         '(see deviations)', choices=('none', 'thread', 'process')),
    Flag('action_repeat', 2, 'environment steps per agent step', positive=True, fixed=True),
    Flag('time_limit', 1000, 'environment steps per episode', positive=True),
    Flag('prefill', 5000, 'environment steps of random actions before training'),
    Flag('eval_noise', 0.0, 'exploration noise during evaluation'),
    Flag('clip_rewards', 'none', 'none or tanh', choices=('none', 'tanh')),
    Flag('worker_timeout', 120.0, 'seconds an environment worker may take to answer one call', positive=True),
    Flag('life_done', 'train', 'Atari: a lost life ends the episode in training only (`train`, the paper\'s code: '
         'evaluation plays whole games), in training and evaluation (`both`, the TF2 reference), or `never` (only '
         'game over does)', choices=('train', 'both', 'never')),
    # Model.
    Flag('deter_size', 200, 'RSSM deterministic state size', positive=True, fixed=True),
    Flag('stoch_size', 30, 'RSSM stochastic state size', positive=True, fixed=True),
    Flag('num_units', 400, 'units of the dense heads', positive=True, fixed=True),
    Flag('dense_act', 'elu', 'activation of the dense heads', choices=ACTS),
    Flag('cnn_act', 'relu', 'activation of the encoder and decoder', choices=ACTS),
    Flag('cnn_depth', 32, 'encoder/decoder channel multiplier', positive=True, fixed=True),
    Flag('pcont', False, 'learn a discount (continuation) head', fixed=True),
    Flag('free_nats', 3.0, 'KL free nats'),
    Flag('kl_scale', 1.0, 'KL scale'),
    Flag('pcont_scale', 10.0, 'weight of the pcont log-likelihood'),
    Flag('weight_decay', 0.0, 'decoupled weight decay on the variables matched by `--weight_decay_pattern`'),
    Flag('weight_decay_pattern', r'.*', 'regular expression on variable names such as `model/encode/h1/kernel`',
         shown='`.*`'),
    Flag('shared_noise', True, "the reference's RSSM sampling: one noise vector per step shared by the batch; "
         'False: independent'),
    # Training.
    Flag('batch_size', 50, 'sequences per batch', positive=True),
    Flag('batch_length', 50, 'steps per sequence', minimum=2),
    Flag('train_every', 1000, 'environment steps between training rounds', positive=True),
    Flag('train_steps', 100, 'updates per training round', positive=True),
    Flag('pretrain', 100, 'updates in the first round'),
    Flag('model_lr', 6e-4, 'Adam learning rate of the world model'),
    Flag('value_lr', 8e-5, 'Adam learning rate of the value'),
    Flag('actor_lr', 8e-5, 'Adam learning rate of the actor'),
    Flag('grad_clip', 100.0, 'global-norm gradient clipping'),
    Flag('dataset_balance', False, "bias window starts towards episode ends, as the reference's option"),
    Flag('replay_cache_gb', 10.0, 'episodes kept in memory; evicted ones are read back from disk when drawn',
         positive=True),
    # Behavior.
    Flag('discount', 0.99, 'discount of the lambda-return'),
    Flag('disclam', 0.95, 'lambda of the lambda-return'),
    Flag('horizon', 15, 'imagination horizon', positive=True),
    Flag('value_estimate', 'lambda', "what the actor maximizes (the paper's ablation): lambda: V_lambda with "
         '`--disclam`; nstep: V_N^k with `--nstep`; reward: V_R, the imagined rewards up to the horizon and no value '
         "network (the paper's \"No value\")", choices=('lambda', 'nstep', 'reward'), fixed=True),
    Flag('nstep', 0, 'k of `--value_estimate nstep`, 1 to `--horizon`', minimum=0, shown='the horizon'),
    Flag('behavior', 'actor', "actor: learn an actor in imagination; cem: PlaNet's online planning on the learned "
         'model (no actor, no value network), for collection (with the exploration noise) and evaluation',
         choices=('actor', 'cem'), fixed=True),
    Flag('cem_horizon', 12, 'planning horizon of `--behavior cem`', positive=True),
    Flag('cem_candidates', 1000, 'action sequences drawn per CEM iteration', positive=True),
    Flag('cem_topk', 100, 'best sequences the CEM refits its Normal to', positive=True),
    Flag('cem_iterations', 10, 'CEM iterations per agent step', positive=True),
    Flag('representation', 'reconstruction', 'the world model\'s objective besides the reward (and KL): '
         "reconstruction: the image decoder; contrastive: the paper's contrastive objective instead (no decoder); "
         'reward: none (no decoder)', choices=('reconstruction', 'contrastive', 'reward'), fixed=True),
    Flag('action_dist', 'tanh_normal', 'tanh_normal, onehot (straight-through gradients, the TF2 reference) or '
         "onehot_score (score-function gradients, the paper's code; see Atari)",
         choices=('tanh_normal',) + ONEHOT, fixed=True),
    Flag('action_init_std', 5.0, 'initial std of the tanh-normal actor'),
    Flag('expl', 'additive_gaussian', 'exploration: additive_gaussian, completely_random (continuous actions) or '
         'epsilon_greedy (discrete)', choices=('additive_gaussian', 'completely_random', 'epsilon_greedy')),
    Flag('expl_amount', 0.3, 'exploration amount (noise std or epsilon)'),
    Flag('expl_decay', 0.0, 'environment steps over which the amount changes as `--expl_schedule` says '
         '(0: constant)'),
    Flag('expl_min', 0.0, 'floor of the exploration amount'),
    Flag('expl_schedule', 'halving', 'halving: the amount halves every `expl_decay` steps (the TF2 reference); '
         "linear: it goes in a straight line from `expl_amount` to `expl_min`, reached at step `expl_decay` (the "
         "paper's code)", choices=('halving', 'linear')),
)
BY_NAME = {flag.name: flag for flag in FLAGS}

# The paper's own code's settings for discrete control (google-research/dreamer, scripts/configs.py `discrete`;
# the README lists each value's source), applied to every task with discrete actions under the flags the user sets.
# Its epsilon, 0.4 * max(0.25, 1 - s / 1e7) over trainer steps s (10 per agent step), is linear from 0.4 to 0.1
# over 7.5e5 agent steps = 3e6 env steps at Atari's action repeat 4.
DISCRETE = dict(kl_scale=0.1, horizon=10, clip_rewards='tanh', action_dist='onehot_score', expl='epsilon_greedy',
                expl_amount=0.4, expl_schedule='linear', expl_decay=3e6, expl_min=0.1, eval_noise=0.001)
# A suite's settings: Atari's are the paper's (its `atari` and `pcont` configs with `discrete`). Gymnasium tasks get
# a learned discount (`pcont`, as the paper's code for its tasks with terminations), the discrete settings when
# their actions are discrete, and the env's own time limit (suite_defaults).
SUITE_DEFAULTS = dict(
    atari=dict(action_repeat=4, time_limit=108000, pcont=True, **DISCRETE),
    gym=dict(pcont=True),
)


def suite_defaults(task):
  """The settings of a task's suite (applied under the preset and the flags given). A gym_<id> task's depend on
  its environment, which is made once to find them out (wrappers.describe_gym, in its own process; an id that does
  not exist raises TaskError)."""
  suite, _, name = task.partition('_')
  settings = dict(SUITE_DEFAULTS.get(suite, {}))
  if suite == 'gym':
    info = wrappers.describe_gym(name)
    if info['kind'] == 'discrete':
      settings.update(DISCRETE)
    if info['max_episode_steps']:
      settings['time_limit'] = int(info['max_episode_steps'])
  return settings


# Named presets (--preset), applied after the suite defaults and before the flags the user sets.
PRESETS = dict(
    none=dict(),
    # Small networks and batches for a 2-core CPU (see docs/cpu_experiment.md).
    cpu=dict(deter_size=100, stoch_size=20, num_units=200, cnn_depth=16, batch_size=16, batch_length=50,
             train_steps=100, pretrain=100, intra_op_threads=1),
    # Tiny everything, for tests and smoke runs (50-step episodes: rendering is most of a tiny run's time).
    debug=dict(deter_size=16, stoch_size=4, num_units=16, cnn_depth=2, batch_size=4, batch_length=10,
               train_steps=1, pretrain=3, horizon=3, prefill=100, eval_every=100, train_every=50,
               log_every=50, time_limit=50, steps=500),
)
PRESET_HELP = 'none, cpu or debug: named settings applied under the flags you give'

# The actions a suite's tasks have, and the settings that fit them.
ACTION_SETTINGS = dict(
    discrete=dict(action_dist=ONEHOT, expl=('epsilon_greedy',)),
    continuous=dict(action_dist=('tanh_normal',), expl=('additive_gaussian', 'completely_random')),
)


def define_config():
  """The reference's defaults, as an attribute dict keyed by flag name."""
  return AttrDict((flag.name, flag.default) for flag in FLAGS)


def args_type(default):
  """The parser of a flag: bools only `True`/`False`, ints accept `5e6` but not `0.5`, paths expand `~`."""
  if isinstance(default, bool):
    def parse_bool(x):
      if x not in ('True', 'False'):
        raise argparse.ArgumentTypeError(f"expected True or False, got '{x}'")
      return x == 'True'
    return parse_bool
  if isinstance(default, int):
    def parse_int(x):
      try:
        value = float(x)
      except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{x}'") from None
      if not np.isfinite(value) or value != int(value):
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{x}'")
      return int(value)
    return parse_int
  if isinstance(default, float):
    return float
  if isinstance(default, pathlib.Path):
    return lambda x: pathlib.Path(x).expanduser()
  return type(default)


def shown(flag):
  if flag.shown is not None:
    return flag.shown
  return str(flag.default)


def make_parser():
  parser = argparse.ArgumentParser(
      prog='dreamer.py', description='Dreamer: learning behaviors by latent imagination. Every flag defaults to '
      "the reference's value; atari_* tasks get the paper's discrete-control settings under the flags you give.")
  parser.add_argument('--preset', choices=list(PRESETS), default='none', help=PRESET_HELP)
  for flag in FLAGS:
    help_text = flag.help.replace('`', '').replace('%', '%%') + f' (default: {shown(flag).strip("`")})'
    parser.add_argument(f'--{flag.name}', type=args_type(flag.default), default=argparse.SUPPRESS,
                        metavar=type(flag.default).__name__.upper(), help=help_text)
  return parser


def parse_args(argv=None):
  """Config = defaults, then the task's suite defaults, then --preset, then the flags given (which always win).
  Types are parsed here (argparse exits 2 on a malformed value); values are checked by check_config."""
  given = vars(make_parser().parse_args(argv))
  preset = given.pop('preset')
  defaults = define_config()
  config = AttrDict(defaults)
  for layer in (suite_defaults(given.get('task', defaults.task)), PRESETS[preset], given):
    for key, value in layer.items():
      config[key] = type(defaults[key])(value)
  if 'nstep' not in given:  # Its default is derived: the horizon (the flag's 0 stands for it).
    config.nstep = config.horizon
  config.preset = preset
  return config


def parse_and_check(argv=None):
  """The config of a command line; a flag error exits 2 with one line naming the flag (argparse does the same for
  malformed values), without a traceback."""
  try:
    config = parse_args(argv)
    check_config(config)
  except (UserError, wrappers.TaskError) as e:
    print(f'Error: {e}', file=sys.stderr)
    sys.exit(2)
  return config


def check_config(config):
  """Raises UserError naming the first flag whose value is not allowed, alone or with the others."""
  for flag in FLAGS:
    value = config[flag.name]
    if flag.choices and value not in flag.choices:
      raise UserError(f"--{flag.name} {value} is not allowed; choose one of: {', '.join(map(str, flag.choices))}.")
    if flag.positive and value <= 0:
      raise UserError(f'--{flag.name} must be positive, got {value}.')
    if flag.minimum is not None and value < flag.minimum:
      raise UserError(f'--{flag.name} must be at least {flag.minimum}, got {value}.')
  if config.eval_every < config.action_repeat:
    raise UserError(f'--eval_every {config.eval_every} is less than one agent step (--action_repeat '
                    f'{config.action_repeat}); nothing would be collected between evaluations.')
  training = not (config.eval_only or config.benchmark)
  if (training and config.task.startswith(('dmc_', 'gym_'))
      and config.time_limit // config.action_repeat < config.batch_length):
    raise UserError(f'Episodes of --time_limit {config.time_limit} / --action_repeat {config.action_repeat} = '
                    f'{config.time_limit // config.action_repeat} steps are shorter than --batch_length '
                    f'{config.batch_length}; no training window would fit.')
  check_variant(config)
  suite = config.task.partition('_')[0]
  if suite == 'dmlab':
    version = '.'.join(map(str, sys.version_info[:2]))
    raise UserError(f'--task {config.task}: DeepMind Lab (the paper\'s other discrete-control domain) has no '
                    f'package that pip installs for this Python ({version}), so this port cannot run it. '
                    'Use an atari_*, dmc_* or gym_* task.')
  if suite not in wrappers.SUITES:
    raise UserError(f"Unknown suite in --task {config.task}. Suites: {', '.join(wrappers.SUITES)} "
                    "(tasks are named <suite>_<task>, e.g. dmc_walker_walk, atari_pong, gym_HalfCheetah-v5).")
  kind = 'discrete' if suite == 'atari' else 'continuous'
  if suite == 'gym':
    kind = wrappers.describe_gym(config.task.partition('_')[2])['kind']
  for key, allowed in ACTION_SETTINGS[kind].items():
    if config[key] not in allowed:
      advice = ' or '.join(f'--{key} {value}' for value in allowed)
      raise UserError(f'--{key} {config[key]} does not fit the {kind} actions of {config.task}; use {advice}.')


def check_variant(config):
  """The values and combinations of the ablation flags (--value_estimate, --behavior, --representation)."""
  if config.value_estimate == 'nstep' and not 1 <= config.nstep <= config.horizon:
    raise UserError(f'--nstep {config.nstep} is not a number of imagined steps of --horizon {config.horizon}; use '
                    f'--nstep 1..{config.horizon} (or leave it out: the horizon).')
  if config.behavior == 'cem':
    if config.value_estimate != 'lambda':
      raise UserError(f'--value_estimate {config.value_estimate} does nothing under --behavior cem (it plans '
                      'without an actor or a value network); leave --value_estimate out or use --behavior actor.')
    if config.cem_topk > config.cem_candidates:
      raise UserError(f'--cem_topk {config.cem_topk} is more than --cem_candidates {config.cem_candidates}; CEM '
                      'refits to the topk best candidates, so use a --cem_topk of at most --cem_candidates.')
    # The paper's code planned with CEM only in continuous control (its `planet` and `cem` settings have no
    # discrete variant; the Atari and DMLab runs used the actor), and clipped Normal samples are no one-hot actions.
    if config.action_dist != 'tanh_normal':
      raise UserError(f'--behavior cem needs continuous actions (--action_dist tanh_normal, not '
                      f'{config.action_dist}): the paper planned with CEM in continuous control only; use '
                      '--behavior actor for discrete actions.')


def check_resume(config, has_data):
  """Compares the flags with the run's saved config.json (when the logdir holds episodes or a checkpoint, i.e.
  `has_data`): differences in fixed flags stop, others are reported."""
  path = config.logdir / 'config.json'
  if not path.exists() or not has_data:
    return
  try:
    saved = json.loads(path.read_text())
  except ValueError:
    print(f'Warning: {path} is unreadable; it will be rewritten.', file=sys.stderr)
    return
  ignore = ('logdir', 'checkpoint', 'eval_only', 'eval_episodes')
  changed = {k: (saved[k], v) for k, v in config.items()
             if k in saved and k not in ignore and saved[k] != (str(v) if isinstance(v, pathlib.Path) else v)}
  # The two one-hot estimators have the same variables: a run may switch between them.
  fixed = {k: change for k, change in changed.items() if k in BY_NAME and BY_NAME[k].fixed
           and not (k == 'action_dist' and set(change) <= set(ONEHOT))}
  if fixed:
    listing = '; '.join(f'--{k} was {old}, now {new}' for k, (old, new) in fixed.items())
    raise UserError(f'{config.logdir} holds a run with other settings: {listing}. These cannot change when '
                    'resuming; use the same values or a new --logdir.')
  # Flags newer than the code that wrote config.json: that run had their defaults (reported, never stopped: a
  # suite's or preset's value may differ from the default without the run having differed).
  changed.update({k: (f'{BY_NAME[k].default} (the default: its config.json has no such flag)', v)
                  for k, v in config.items() if k in BY_NAME and k not in saved and k not in ignore
                  and v != BY_NAME[k].default})
  if changed:
    listing = '; '.join(f'--{k} {old} -> {new}' for k, (old, new) in changed.items())
    print(f'Resuming with changed flags (applied): {listing}.')


# The README's flags table ---------------------------------------------------------------------------------------------

README_START = '<!-- flags table: written by `python flags.py --readme` -->'
README_END = '<!-- end of flags table -->'


def markdown_table():
  rows = ['| flag | default | meaning |', '|---|---|---|']
  rows.append(f'| `--preset` | none | {PRESET_HELP} |')
  for flag in FLAGS:
    rows.append(f'| `--{flag.name}` | {shown(flag)} | {flag.help}{" (fixed on resume)" if flag.fixed else ""} |')
  return '\n'.join(rows)


def readme_with_table(text):
  start, end = text.index(README_START) + len(README_START), text.index(README_END)
  return text[:start] + '\n' + markdown_table() + '\n' + text[end:]


if __name__ == '__main__':
  if sys.argv[1:] != ['--readme']:
    sys.exit('usage: python flags.py --readme   (rewrites the flags table in README.md)')
  readme = pathlib.Path(__file__).with_name('README.md')
  readme.write_text(readme_with_table(readme.read_text()))
  print(f'Wrote the flags table of {readme}.')
