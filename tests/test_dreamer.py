"""End to end: the command (in the test process, or its own where it must start without TensorFlow) on a real dmc
task with tiny sizes, its files, resuming, and bad input."""

import json
import re

import numpy as np
import pytest


import tools
from helpers import TINY, run_cli, run_dreamer as run


def read_metrics(logdir):
  return [json.loads(line) for line in (logdir / 'metrics.jsonl').read_text().splitlines()]


def event_tags(logdir):
  from tensorboard.backend.event_processing import event_accumulator
  tags = set()
  for path in logdir.glob('events.out.tfevents.*'):
    acc = event_accumulator.EventAccumulator(str(path), size_guidance={'tensors': 0, 'images': 0})
    acc.Reload()
    for kind in ('tensors', 'images', 'scalars'):
      tags.update(acc.Tags().get(kind, []))
  return tags


@pytest.fixture(scope='module')
def first_run(tmp_path_factory):
  logdir = tmp_path_factory.mktemp('run') / 'walker'
  code, out, err = run_cli('--logdir', str(logdir), '--steps', '300', *TINY)  # In this process: TF is imported.
  assert code == 0, out[-3000:] + err[-3000:]
  return logdir, out


@pytest.mark.e2e
@pytest.mark.xdist_group('first_run')
def test_first_run_writes_episodes_in_reference_format(first_run):
  logdir, _ = first_run
  files = sorted((logdir / 'episodes').glob('*.npz'))
  assert files, 'no episodes written'
  for filename in files:
    match = re.fullmatch(r'\d{8}T\d{6}-[0-9a-f]{32}-(\d+)\.npz', filename.name)
    assert match, filename.name
    episode = tools.load_episode(filename)
    length = int(match.group(1))
    assert length == 26  # time_limit 50 / action_repeat 2 transitions + the reset step.
    assert {'image', 'action', 'reward', 'discount', 'orientations', 'height', 'velocity'} <= set(episode)
    assert all(len(v) == length for v in episode.values())
    assert episode['image'].dtype == np.uint8 and episode['image'].shape[1:] == (64, 64, 3)
    assert np.all(episode['action'][0] == 0) and episode['reward'][0] == 0 and episode['discount'][0] == 1
    assert np.abs(episode['action']).max() <= 1.0
  assert not list((logdir / 'episodes').glob('*.tmp'))
  # 300 env steps were asked for: prefill 100, then two rounds of eval_every 100 collected.
  assert tools.count_episodes(logdir / 'episodes')[1] * 2 >= 300


@pytest.mark.e2e
@pytest.mark.xdist_group('first_run')
def test_first_run_metrics_and_summaries(first_run):
  logdir, out = first_run
  metrics = read_metrics(logdir)
  train = [m for m in metrics if 'train/return' in m]
  test = [m for m in metrics if 'test/return' in m]
  scalars = [m for m in metrics if 'model_loss' in m]
  assert train and test and scalars
  assert set(train[0]) == {'step', 'train/return', 'train/length', 'episodes'}
  assert set(test[0]) == {'step', 'test/return', 'test/length', 'episodes'}
  expected = {'step', 'model_grad_norm', 'value_grad_norm', 'actor_grad_norm', 'prior_ent', 'post_ent',
              'image_loss', 'reward_loss', 'div', 'model_loss', 'value_loss', 'actor_loss', 'action_ent',
              'expl_amount'}
  assert expected <= set(scalars[0])
  for line in scalars:
    assert all(np.isfinite(v) for v in line.values()), line
  tags = event_tags(logdir)
  assert {'agent/model_loss', 'sim/train/return', 'sim/test/return', 'sim/episodes'} <= tags, tags
  assert 'agent/openl/gif' in tags and 'sim/test/video/gif' in tags, tags
  assert 'Progress: step' in out
  assert 'Training for 3 steps.' in out  # The pretraining round.
  config = json.loads((logdir / 'config.json').read_text())
  assert config['deter_size'] == 16 and config['task'] == 'dmc_walker_walk'


@pytest.mark.e2e
@pytest.mark.xdist_group('first_run')
def test_first_run_checkpoint(first_run):
  logdir, _ = first_run
  values = tools.read_checkpoint(logdir / 'variables.pkl')
  assert len(values) == 82  # The reference's count for the default (tanh_normal, no pcont) agent.
  assert values[0].dtype == np.int64 and values[0].shape == ()
  assert values[0] >= 300
  assert values[9].shape == (16, 12)  # Actor output: mean and std of 6 action dims.
  assert not (logdir / 'variables.pkl.tmp').exists()


def test_unknown_task_exits_2_with_the_valid_names(tmp_path):
  code, _, err = run_cli('--logdir', str(tmp_path / 'a'), *TINY, '--task', 'dmc_walker_fly')
  assert code == 2, err[-2000:]
  assert 'dmc_walker_walk' in err
  assert not (tmp_path / 'a' / 'config.json').exists()  # A typo does not lock the logdir to the wrong task.
  code, _, err = run_cli('--logdir', str(tmp_path / 'b'), '--task', 'foo_pong')
  assert code == 2 and 'dmc' in err and 'atari' in err and 'gym' in err
  code, _, err = run_cli('--logdir', str(tmp_path / 'c'), '--task', 'gym_pong')
  assert code == 2 and "Unknown Gymnasium id 'pong'" in err, err[-2000:]


@pytest.mark.e2e
def test_bad_flag_value_names_the_flag(tmp_path):
  result = run('--logdir', str(tmp_path), '--steps', '0.5', timeout=120)
  assert result.returncode == 2 and '--steps' in result.stderr
  result = run('--logdir', str(tmp_path), '--pcont', 'yes', timeout=120)
  assert result.returncode == 2 and '--pcont' in result.stderr
  result = run('--logdir', str(tmp_path), '--parallel', 'gpu', timeout=120)
  assert result.returncode == 2 and '--parallel' in result.stderr and 'Traceback' not in result.stderr
  result = run('--logdir', str(tmp_path), '--time_limit', '80', timeout=120)
  assert result.returncode == 2 and '--batch_length 50' in result.stderr and 'Traceback' not in result.stderr


def test_empty_replay_without_prefill_exits_2(tmp_path):
  code, _, err = run_cli('--logdir', str(tmp_path / 'empty'), '--prefill', '0')
  assert code == 2 and '--prefill 0' in err


def test_unwritable_logdir_fails_before_environments(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('not a folder')
  code, out, err = run_cli('--logdir', str(blocker / 'run'), *TINY)
  assert code == 2
  assert '--logdir' in err
  assert 'Prefill' not in out
