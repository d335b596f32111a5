"""Crash-safe runs: kill -9 and restart, Ctrl-C/SIGTERM, non-finite steps, bounded replay, changed flags."""

import hashlib
import json
import os
import pathlib
import re
import signal
import time

import numpy as np
import pytest


import dreamer
import loop
import tools
from helpers import TINY, fake_episodes, run_cli, start_dreamer, tiny_agent


@pytest.fixture
def agent(tmp_path):
  yield tiny_agent(tmp_path, '--train_steps', '3', '--pretrain', '3', '--train_every', '10')


def nan_batches(dataset):
  data = next(dataset)
  data = dict(data, action=data['action'] * np.nan)  # Every loss and gradient becomes NaN.
  return iter(lambda: data, None)


def test_nonfinite_step_is_skipped_and_counted(agent):
  agent, dataset, _ = agent
  before = [v.numpy().copy() for _, v in agent.checkpoint_table()[1:]]
  metrics = agent.train(next(nan_batches(dataset)), [0, 1])
  assert float(metrics['nonfinite']) == 1.0
  for value, (name, var) in zip(before, agent.checkpoint_table()[1:]):
    if not name.startswith('_metrics'):
      np.testing.assert_array_equal(value, var.numpy(), err_msg=name)
  metrics = agent.train(next(dataset), [0, 2])  # A finite batch trains again.
  assert float(metrics['nonfinite']) == 0.0


def test_round_of_only_nonfinite_steps_stops_the_run(agent, tmp_path):
  agent, dataset, config = agent
  counter = loop.Counter(tmp_path / 'episodes', config.action_repeat)
  trainer = loop.Trainer(agent, nan_batches(dataset), config, counter, loop.Logger(tmp_path, None, config.steps))
  obs = {'image': np.zeros((1, 64, 64, 3), np.uint8)}
  with pytest.raises(dreamer.NonFiniteError, match='All 3 train steps'):
    trainer.policy(training=True)(obs, np.array([True]), None)


def test_replay_cache_is_bounded_and_sampling_stays_uniform(tmp_path, monkeypatch):
  fake_episodes(tmp_path, 5, length=11)
  one = sum(v.nbytes for v in tools.load_episode(next(tmp_path.glob('*.npz'))).values())
  reads = []
  real_load = tools.load_episode
  monkeypatch.setattr(tools, 'load_episode', lambda f: reads.append(f) or real_load(f))
  counts = {}
  generator = tools.load_episodes(tmp_path, 100, length=10, seed=0, cache_bytes=2 * one)
  for _ in range(2000):
    window = next(generator)
    assert len(window['reward']) == 10
    key = window['image'][0].tobytes()[:64]
    counts[key] = counts.get(key, 0) + 1
  assert len(reads) > 5  # Evicted episodes were read back from disk.
  reads.clear()
  generator = tools.load_episodes(tmp_path, 100, length=10, seed=0, cache_bytes=10 * one)
  for _ in range(2000):
    next(generator)
  assert len(reads) == 5  # With room for all, each file is read once.
  per_episode = {}
  for filename in tmp_path.glob('*.npz'):
    episode = real_load(filename)
    per_episode[filename] = sum(counts.get(episode['image'][i].tobytes()[:64], 0) for i in range(2))
  assert all(250 < n < 550 for n in per_episode.values()), per_episode  # ~400 each.


def test_resume_with_shape_changing_flags_stops(tmp_path):
  logdir = tmp_path / 'run'
  logdir.mkdir()
  saved = dict(dreamer.define_config(), logdir=str(logdir), deter_size=16, num_units=16, batch_size=4)
  (logdir / 'config.json').write_text(json.dumps(saved, default=str))
  fake_episodes(logdir / 'episodes', 1)  # The old run stored data under its flags.
  code, _, err = run_cli('--logdir', str(logdir), '--deter_size', '32', '--num_units', '16',
                         '--batch_size', '8')
  assert code == 2
  assert '--deter_size was 16, now 32' in err
  assert '--batch_size' not in err  # Not a shape-changing flag.


def check_logdir(logdir):
  """Every file a run leaves must load."""
  for filename in (logdir / 'episodes').glob('*.npz'):
    episode = tools.load_episode(filename)
    assert len(episode['reward']) == tools.episode_length(filename)
  if (logdir / 'variables.pkl').exists():
    assert len(tools.read_checkpoint(logdir / 'variables.pkl')) == 82
  for line in (logdir / 'metrics.jsonl').read_text().splitlines() if (logdir / 'metrics.jsonl').exists() else []:
    json.loads(line)
  json.loads((logdir / 'config.json').read_text())


def start(logdir, steps):
  return start_dreamer('--logdir', str(logdir), '--steps', str(steps), *TINY)


def wait_for(process, text, occurrence=1, timeout=300):
  """Reads the run's output until `text` has appeared `occurrence` times; returns the lines read."""
  lines, seen, deadline = [], 0, time.time() + timeout
  for line in process.stdout:
    lines.append(line)
    seen += text in line
    if seen == occurrence:
      return lines
    assert time.time() < deadline, ''.join(lines)
  raise AssertionError(f'the run ended before printing {text!r} {occurrence} times:\n' + ''.join(lines))


@pytest.mark.e2e(longest=True)
def test_killed_and_stopped_at_each_point_the_run_resumes(tmp_path):
  """One run of 300 steps, stopped at deterministic points and restarted each time with the same command: kill -9
  while prefilling (an episode was just saved) and once the prefill is done (no checkpoint yet; nothing is written
  between then and the pretraining round's first log, so this is the state a kill as pretraining starts leaves,
  without this process paying for the build step); SIGTERM once collection starts (the restart did not load a
  checkpoint and pretrained; the signal saves one and exits 130); kill -9 at the second evaluation (the restart
  loaded the SIGTERM checkpoint, and the loop has saved its own since); then a restart that loads it and finishes
  without a prefill or a second pretraining round, its step count continuing from the episodes on disk. Every file
  left behind loads after each stop."""
  logdir, steps = tmp_path / 'run', 300
  for text, occurrence in (('Train episode of length', 1), ('Simulating agent for', 1)):
    process = start(logdir, steps)
    lines = wait_for(process, text, occurrence)
    process.kill()
    process.wait()
    check_logdir(logdir)
    assert not (logdir / 'variables.pkl').exists()
  episodes_before = tools.count_episodes(logdir / 'episodes')
  assert episodes_before[0] >= 2  # The prefill went on where the first kill left it.

  process = start(logdir, steps)
  lines = wait_for(process, 'Start collection.')
  assert not any('Load checkpoint' in line for line in lines), ''.join(lines)
  assert any('Training for 3 steps.' in line for line in lines), ''.join(lines)  # The pretraining round.
  assert not (logdir / 'variables.pkl').exists()
  process.send_signal(signal.SIGTERM)
  out, _ = process.communicate(timeout=120)
  assert process.returncode == 130, ''.join(lines) + out
  assert f'Interrupted; saved {logdir / "variables.pkl"}.' in out
  assert len(tools.read_checkpoint(logdir / 'variables.pkl')) == 82
  check_logdir(logdir)
  sigterm_step = int(tools.read_checkpoint(logdir / 'variables.pkl')[0])

  process = start(logdir, steps)
  lines = wait_for(process, 'Start evaluation.', 2)
  process.kill()
  process.wait()
  assert any('Load checkpoint' in line for line in lines), ''.join(lines)
  check_logdir(logdir)
  assert int(tools.read_checkpoint(logdir / 'variables.pkl')[0]) > sigterm_step  # The loop's own checkpoint.

  before = tools.count_episodes(logdir / 'episodes')
  before_lines = len((logdir / 'metrics.jsonl').read_text().splitlines())
  process = start(logdir, steps)
  out, _ = process.communicate(timeout=600)
  assert process.returncode == 0, out[-3000:]
  assert 'Load checkpoint' in out and 'Prefill dataset with 0 steps.' in out, out[-3000:]
  assert 'Training for 3 steps.' not in out  # Loading marks pretraining as done.
  check_logdir(logdir)
  new_lines = [json.loads(line) for line in (logdir / 'metrics.jsonl').read_text().splitlines()[before_lines:]]
  assert new_lines and min(line['step'] for line in new_lines) >= before[1] * 2, new_lines
  episodes, transitions = tools.count_episodes(logdir / 'episodes')
  assert episodes > before[0] and transitions * 2 >= steps
  assert int(tools.read_checkpoint(logdir / 'variables.pkl')[0]) == transitions * 2


@pytest.mark.e2e
def test_stopped_inside_the_pretraining_round_the_run_resumes_it(tmp_path):
  """SIGTERM two seconds into a pretraining round of 400 updates saves the checkpoint with the round's progress;
  the same command again loads it, trains the updates the round still owes as its first round, and once the round
  is done and a checkpoint saved, the progress file is gone."""
  logdir = tmp_path / 'run'
  argv = ('--logdir', str(logdir), '--steps', '150', *TINY, '--pretrain', '400')
  process = start_dreamer(*argv)
  lines = wait_for(process, 'Training for 400 steps.')
  time.sleep(2)
  process.send_signal(signal.SIGTERM)
  out, _ = process.communicate(timeout=120)
  assert process.returncode == 130, ''.join(lines) + out
  match = re.search(r'The pretraining round stopped after (\d+) of its 400 updates', out)
  assert match, out[-3000:]
  done = int(match.group(1))
  assert 0 < done < 400, out[-3000:]
  digest = hashlib.sha256((logdir / 'variables.pkl').read_bytes()).hexdigest()
  assert json.loads((logdir / loop.PRETRAIN_FILE).read_text()) == dict(pretrain=400, done=done, checkpoint=digest)
  assert len(tools.read_checkpoint(logdir / 'variables.pkl')) == 82

  process = start_dreamer(*argv)
  out, _ = process.communicate(timeout=300)
  assert process.returncode == 0, out[-3000:]
  assert 'Load checkpoint' in out, out[-3000:]
  assert f'stopped after {done} updates; {400 - done} of --pretrain 400 left.' in out, out[-3000:]
  rounds = re.findall(r'Training for (\d+) steps\.', out)
  assert rounds[0] == str(400 - done) and set(rounds[1:]) == {'1'}, rounds  # Then rounds of --train_steps 1.
  assert not (logdir / loop.PRETRAIN_FILE).exists()
  check_logdir(logdir)


def worker_pids(pid):
  """The environment workers (`wrappers.py --worker`) a process started."""
  pids = []
  for entry in pathlib.Path('/proc').iterdir():
    try:
      stat = (entry / 'stat').read_text().rsplit(')', 1)[1].split()
      command = (entry / 'cmdline').read_bytes().replace(b'\0', b' ').decode()
    except (OSError, IndexError):
      continue
    if int(stat[1]) == pid and 'wrappers.py' in command and '--worker' in command:
      pids.append(int(entry.name))
  return pids


@pytest.mark.e2e
def test_a_dead_environment_worker_stops_the_run_with_a_checkpoint(tmp_path):
  """kill -9 of a training environment's worker during collection: the run stops with exit code 1 and a message
  naming the environment, and saves what the agent learned since the last checkpoint first."""
  logdir = tmp_path / 'run'
  process = start(logdir, 400)
  lines = wait_for(process, 'Start collection.')
  assert not (logdir / 'variables.pkl').exists()  # The first checkpoint would come after this collection.
  workers = worker_pids(process.pid)
  assert len(workers) == 2, workers  # One train and one test environment.
  for pid in workers:
    os.kill(pid, signal.SIGKILL)
  out, _ = process.communicate(timeout=120)
  assert process.returncode == 1, ''.join(lines) + out
  assert "Environment worker 'dmc_walker_walk train 0'" in out and 'died while' in out, out[-3000:]
  assert f'Saved {logdir / "variables.pkl"}; the same command resumes the run.' in out, out[-3000:]
  assert len(tools.read_checkpoint(logdir / 'variables.pkl')) == 82


def test_weight_decay_applies_to_the_matching_variables_only(tmp_path):
  kernels = {}
  for wd in (0.0, 0.5):
    agent, dataset, _ = tiny_agent(tmp_path, '--weight_decay', str(wd), '--weight_decay_pattern',
                                   r'^model/encode/h1/kernel$')
    before = agent._encode.h1.kernel.numpy().copy()
    agent.train(next(dataset), [0, 1])
    kernels[wd] = (before, agent._encode.h1.kernel.numpy(), agent._encode.h2.kernel.numpy())
  (before0, after0, other0), (before5, after5, other5) = kernels[0.0], kernels[0.5]
  np.testing.assert_allclose(before0, before5)  # Same seed, same start.
  np.testing.assert_allclose(other0, other5, atol=1e-6)  # Unmatched variables: no decay.
  np.testing.assert_allclose(after0 - after5, 6e-4 * 0.5 * before0, atol=1e-6)  # lr * wd * var.
