"""The paper's ablations as flags (issue 13): each variant's networks, checkpoint structure and metrics, its flag
checks, and one tiny end-to-end run per group of variants (train, --eval_only from its checkpoint; one resumes)."""

import json

import keras
import numpy as np
import pytest
from gymnasium import spaces

import dreamer
import flags
import tools
from helpers import build_agent, resolve, run_cli

WALKER_ACTIONS = spaces.Box(-1, 1, (6,))

# Per variant: its flags, the networks the agent must hold (and must not), and its metrics besides the world model's
# (div, expl_amount, model_grad_norm, model_loss, post_ent, prior_ent, reward_loss).
ACTOR = {'action_ent', 'actor_grad_norm', 'actor_loss'}
VALUE = {'value_grad_norm', 'value_loss'}
VARIANTS = {
    'dreamer': ([], ['_actor', '_decode', '_value'], ACTOR | VALUE | {'image_loss'}),
    'dreamer_nstep': (['--value_estimate', 'nstep', '--nstep', '2'], ['_actor', '_decode', '_value'],
                      ACTOR | VALUE | {'image_loss'}),
    'no_value': (['--value_estimate', 'reward'], ['_actor', '_decode'], ACTOR | {'image_loss'}),
    'planet': (['--behavior', 'cem'], ['_decode'], {'image_loss', 'planned_return'}),
    'contrastive': (['--representation', 'contrastive'], ['_actor', '_cpc', '_value'],
                    ACTOR | VALUE | {'cpc_loss', 'cpc_accuracy'}),
    'reward_only': (['--representation', 'reward'], ['_actor', '_value'], ACTOR | VALUE),
}
NETWORKS = ('_actor', '_cpc', '_decode', '_value')
MODEL = {'div', 'expl_amount', 'model_grad_norm', 'model_loss', 'post_ent', 'prior_ent', 'reward_loss'}


def modules(names):
  """The modules of checkpoint names in the order they first appear."""
  return list(dict.fromkeys(name.split('/')[0] for name in names))


@pytest.mark.parametrize('variant', list(VARIANTS))
def test_each_variant_builds_only_its_networks_and_saves_them_all(variant, tmp_path):
  argv, networks, metrics = VARIANTS[variant]
  agent = build_agent(['--preset', 'debug', *argv], WALKER_ACTIONS)
  for name in NETWORKS:
    assert hasattr(agent, name) == (name in networks), name
  assert agent.has_decoder == ('_decode' in networks)
  if not agent.has_decoder:  # No decoder, no open-loop video: openl says so instead of failing somewhere inside.
    with pytest.raises(ValueError, match=f'--representation {agent._c.representation} trains no image decoder'):
      agent.openl({})
  assert hasattr(agent, '_value_opt') == ('_value' in networks) and hasattr(agent, '_actor_opt') == (
      '_actor' in networks)
  assert set(dreamer.metric_names(agent._c)) == MODEL | metrics
  table = agent.checkpoint_table()
  names = [name for name, _ in table]
  # The reference's order rule: attributes sorted by name (`_cpc` between `_actor` and `_decode`), the metrics at
  # `_metrics`, and the reward and pcont heads after them (reached through `_model_opt`), `_value` last.
  front = sorted([name for name in networks if name != '_value'] + ['_dynamics', '_encode'])
  expected = ['_step'] + front + ['_metrics', '_reward'] + ['_value'] * ('_value' in networks)
  assert modules(names) == expected, modules(names)
  # Each name denotes the variable stored under it; every weight of every network the agent holds is saved once.
  for name, var in table:
    assert resolve(agent, name) is var, name
  saved = {id(var) for _, var in table}
  assert len(saved) == len(table)
  held = [v for layer in vars(agent).values() if isinstance(layer, keras.layers.Layer) for v in layer.weights]
  assert held and {id(v) for v in held} <= saved
  assert len(table) == 1 + len(held) + 2 * len(dreamer.metric_names(agent._c))
  # Saved and loaded into a fresh agent of the same variant: every weight comes back.
  agent.save(tmp_path / 'variables.pkl', 7)
  other = build_agent(['--preset', 'debug', '--seed', '1', *argv], WALKER_ACTIONS)
  assert other.load(tmp_path / 'variables.pkl') == 7
  for (name, a), (_, b) in zip(table, other.checkpoint_table()):
    np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=name)


@pytest.mark.parametrize('variant, hint', [
    ('no_value', '--value_estimate reward'), ('planet', '--behavior cem'),
    ('reward_only', '--representation reward')])
def test_a_variants_checkpoint_in_the_default_agent_names_the_flag(variant, hint, tmp_path):
  build_agent(['--preset', 'debug', *VARIANTS[variant][0]], WALKER_ACTIONS).save(tmp_path / 'variables.pkl', 0)
  agent = build_agent(['--preset', 'debug'], WALKER_ACTIONS)
  with pytest.raises(tools.CheckpointError, match=hint):
    agent.load(tmp_path / 'variables.pkl')


def test_nstep_defaults_to_the_horizon_and_cem_needs_continuous_actions():
  assert flags.parse_args(['--horizon', '7']).nstep == 7
  assert flags.parse_args(['--preset', 'debug']).nstep == 3
  assert flags.parse_args(['--nstep', '2', '--horizon', '7']).nstep == 2
  flags.check_variant(flags.parse_args(['--behavior', 'cem']))
  for dist in ('onehot', 'onehot_score'):
    with pytest.raises(flags.UserError, match=f'--behavior cem needs continuous actions .*not {dist}'):
      flags.check_variant(flags.parse_args(['--behavior', 'cem', '--action_dist', dist, '--expl', 'epsilon_greedy']))


def test_resume_refuses_another_variant(tmp_path):
  config = flags.parse_args(['--logdir', str(tmp_path), '--representation', 'contrastive'])
  tools.write_json(tmp_path / 'config.json', dict(config))
  # The variant is the experiment: even lambda -> nstep (the same networks) would mix two estimators in one run.
  for flag, value in (('representation', 'reward'), ('behavior', 'cem'), ('value_estimate', 'reward'),
                      ('value_estimate', 'nstep')):
    other = flags.parse_args(['--logdir', str(tmp_path), '--representation', 'contrastive', f'--{flag}', value])
    with pytest.raises(flags.UserError, match=f'--{flag} was'):
      flags.check_resume(other, has_data=True)
  flags.check_resume(flags.parse_args(['--logdir', str(tmp_path), '--representation', 'contrastive',
                                       '--cem_topk', '10']), has_data=True)  # Not fixed: allowed.


# End to end: each group trains on the real walker, resumes from its checkpoint and evaluates it. ------------------

TINY = ['--preset', 'debug', '--precision', '32', '--time_limit', '20', '--prefill', '40', '--eval_every', '40',
        '--train_every', '20', '--log_every', '20', '--steps', '80']
CEM = ['--cem_candidates', '20', '--cem_topk', '5', '--cem_iterations', '2', '--cem_horizon', '3']
GROUPS = {  # Two variants per run where they combine, to keep the suite short.
    'dreamer_nstep+contrastive': ['--value_estimate', 'nstep', '--nstep', '2', '--representation', 'contrastive'],
    'no_value+reward_only': ['--value_estimate', 'reward', '--representation', 'reward'],
    'planet': ['--behavior', 'cem', *CEM],
}


@pytest.mark.e2e
@pytest.mark.parametrize('group', list(GROUPS))
def test_variant_trains_resumes_and_evaluates(group, tmp_path):
  logdir = tmp_path / group
  argv = ['--logdir', str(logdir), *TINY, *GROUPS[group]]
  code, out, err = run_cli(*argv)  # In this process: TensorFlow is imported already.
  assert code == 0, out[-3000:] + err[-3000:]
  config = flags.AttrDict(json.loads((logdir / 'config.json').read_text()))
  expected = set(dreamer.metric_names(config))
  scalars = [json.loads(line) for line in (logdir / 'metrics.jsonl').read_text().splitlines()]
  scalars = [m for m in scalars if 'model_loss' in m]
  assert scalars, 'no training scalars logged'
  for line in scalars:
    assert set(line) - {'fps'} == expected | {'step', 'nonfinite_steps'}, set(line) ^ expected  # fps from the 2nd.
    assert all(np.isfinite(v) for v in line.values()), line
  values = tools.read_checkpoint(logdir / 'variables.pkl')
  assert len(values) == len(dreamer.checkpoint_names(config)) and values[0] >= 80
  if config.representation != 'reconstruction':
    assert 'trains no image decoder, so no agent/openl video' in out
  if group == 'planet':
    # Resume: the same command loads the variant's checkpoint (and adds nothing: its steps are done). Only once,
    # for the variant furthest from the default, as the suite's time matters: the load it does is the agent's
    # load that --eval_only does for every group below, and check_resume is tested in-process above.
    code, out, err = run_cli(*argv)
    assert code == 0, out[-3000:] + err[-3000:]
    assert 'Prefill dataset with 0 steps.' in out and 'Load checkpoint' in out
  # The checkpoint loads into the variant's agent and evaluates with its policy (the CEM plan for planet).
  code, out, err = run_cli(*argv, '--eval_only', 'True', '--eval_episodes', '1')
  assert code == 0, out[-3000:] + err[-3000:]
  evaluation = json.loads((logdir / 'eval.json').read_text())
  assert len(evaluation['returns']) == 1 and evaluation['step'] == int(values[0])
