"""probe.py on a tiny run folder (the debug preset's config.json and random walker-shaped episodes on disk)."""

import json
import math

import flags
import probe
import tools
from helpers import TINY, fake_episodes


def make_run(folder, *argv):
  config = flags.parse_args(TINY + ['--logdir', str(folder), *argv])
  folder.mkdir()
  tools.write_json(folder / 'config.json', dict(config))
  fake_episodes(folder / 'episodes', 3)
  return folder


def read(outdir):
  return [json.loads(line) for line in (outdir / 'probe.jsonl').read_text().splitlines()]


def test_probe_trains_on_the_runs_first_episodes_and_records_policy_and_imagined_returns(tmp_path, capsys):
  run = make_run(tmp_path / 'run', '--seed', '3')
  args = ['--logdir', str(run), '--episodes', '2', '--updates', '4', '--every', '2']
  assert probe.main(args + ['--outdir', str(tmp_path / 'a')]) == 0
  rows = read(tmp_path / 'a')
  assert [row['update'] for row in rows] == [0, 2, 4]
  keys = {'action_mean', 'action_below0', 'std'} | {f'{kind}_{a}' for kind in ('reward_sum', 'value')
                                                     for a in ('-1', '+0', '+1')}
  for row in rows:
    assert set(row) == keys | {'update'}
    assert all(math.isfinite(value) for value in row.values())
    assert -1 <= row['action_mean'] <= 1 and 0 <= row['action_below0'] <= 1 and row['std'] > 0
    # The constant actions lead to different imagined states, so to different predicted rewards.
    assert len({row['reward_sum_-1'], row['reward_sum_+0'], row['reward_sum_+1']}) == 3
  # The updates are real: the actor and the reward head moved.
  assert rows[0]['action_mean'] != rows[-1]['action_mean']
  assert rows[0]['reward_sum_+1'] != rows[-1]['reward_sum_+1']
  assert 'update 4 action_mean' in capsys.readouterr().out
  # The run's flags make the agent (its --seed 3 the initial weights); flags after them win.
  assert probe.main(args + ['--updates', '0', '--outdir', str(tmp_path / 'b')]) == 0
  assert read(tmp_path / 'b') == rows[:1]
  assert probe.main(args + ['--updates', '0', '--outdir', str(tmp_path / 'c'), '--', '--seed', '4']) == 0
  assert read(tmp_path / 'c')[0]['action_mean'] != rows[0]['action_mean']


def test_probe_errors_name_the_bad_input(tmp_path, capsys):
  run = make_run(tmp_path / 'run')
  assert probe.main(['--logdir', str(tmp_path), '--outdir', str(tmp_path / 'out')]) == 2
  assert 'has no config.json' in capsys.readouterr().err
  assert probe.main(['--logdir', str(run), '--outdir', str(tmp_path / 'out'), '--episodes', '5']) == 2
  err = capsys.readouterr().err
  assert '--episodes 5' in err and 'holds 3 episode files' in err
  assert probe.main(['--logdir', str(run), '--outdir', str(tmp_path / 'out'), '--', '--behavior', 'cem']) == 2
  assert 'reads an actor and a value' in capsys.readouterr().err
  assert not (tmp_path / 'out').exists()
