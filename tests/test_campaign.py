"""campaign.py: a campaign of real tiny runs trains, evaluates and copies each run's small files; started again it
skips what is done, resumes a run whose logdir is lost from nothing (and says so), and stops a limited method at
the wall time of the others."""

import json
import pathlib
import shutil
import subprocess
import sys

import pytest

import campaign
from helpers import ROOT

TINY = 'tiny=--preset debug --precision 32'


def run_campaign(tmp_path, *argv):
  result = subprocess.run([sys.executable, str(ROOT / 'campaign.py'), '--outdir', str(tmp_path / 'runs'), '--copy',
                           str(tmp_path / 'copy'), *argv], capture_output=True, text=True, timeout=600)
  return result.returncode, result.stdout + result.stderr


@pytest.mark.e2e(longest=True)  # Minutes: started first, beside the other longest tests.
def test_a_campaign_runs_skips_resumes_and_limits(tmp_path):
  argv = ['--tasks', 'dmc_walker_walk', '--methods', TINY, 'limited=--preset debug --precision 32 --steps 5e3',
          '--seeds', '3', '--steps', '150', '--eval_episodes', '2', '--limit', 'limited=auto']
  code, out = run_campaign(tmp_path, *argv)
  assert code == 0, out[-3000:]
  copy = tmp_path / 'copy' / 'dmc_walker_walk' / 'tiny' / '3'
  assert {p.name for p in copy.iterdir()} == {'config.json', 'metrics.jsonl', 'eval.json', 'run.json'}
  config = json.loads((copy / 'config.json').read_text())
  assert (config['seed'], config['steps'], config['deter_size']) == (3, 150, 16)
  evaluation = json.loads((copy / 'eval.json').read_text())
  assert len(evaluation['returns']) == 2
  info = json.loads((copy / 'run.json').read_text())
  [stretch] = info['stretches']
  assert stretch['exit_code'] == 0 and stretch['steps_from'] == 0 and stretch['steps_to'] >= 150
  assert stretch['device'].startswith(campaign_cpu_model()) and stretch['precision'] == 'float32', stretch
  commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True, cwd=ROOT).stdout
  changed = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no', '--', '*.py'],
                           capture_output=True, text=True, cwd=ROOT).stdout
  assert stretch['code'] == commit.strip() + ('-dirty' if changed.strip() else ''), stretch  # The code it ran.
  assert 0 < info['seconds'] == stretch['seconds'] and info['eval_exit_code'] == 0 and not info['restarts']
  # The limited method ran after the other and was stopped at its wall time (its --steps is out of reach).
  limited = json.loads((tmp_path / 'copy' / 'dmc_walker_walk' / 'limited' / '3' / 'run.json').read_text())
  assert limited['stretches'][0]['stopped'] == f'at the wall-time limit of {info["seconds"]} s', limited
  assert limited['stretches'][0]['steps_to'] < 5000
  assert (tmp_path / 'copy' / 'dmc_walker_walk' / 'limited' / '3' / 'eval.json').exists(), out[-3000:]

  code, out = run_campaign(tmp_path, *argv)  # Everything is done: nothing runs.
  assert code == 0 and out.count(': finished.') == 2 and 'training' not in out, out
  assert json.loads((copy / 'run.json').read_text()) == info

  shutil.rmtree(tmp_path / 'runs' / 'dmc_walker_walk' / 'tiny' / '3')  # The replay is lost, the evidence kept:
  code, out = run_campaign(tmp_path, *argv)  # a finished run is not trained again...
  assert code == 0 and out.count(': finished.') == 2, out
  (copy / 'eval.json').unlink()  # ...an unfinished one starts again from nothing, and says so.
  code, out = run_campaign(tmp_path, *argv)
  assert code == 0 and 'is gone; the run starts again from nothing' in out, out[-3000:]
  again = json.loads((copy / 'run.json').read_text())
  [restart] = again['restarts']
  assert restart['steps_before'] >= 150 and restart['stretches_before'] == info['stretches']
  assert len(again['stretches']) == 1 and again['stretches'][0]['steps_from'] == 0
  assert (copy / 'eval.json').exists()


def campaign_cpu_model():
  import runtime
  return runtime.cpu_model()


@pytest.mark.parametrize('argv, message', [
    (['--methods', 'dreamer_gpu'], '--methods dreamer_gpu: not a known method'),
    (['--methods', 'dreamer', '--limit', 'planet=60'], '--limit planet=60: expected METHOD=SECONDS'),
    (['--methods', 'dreamer', '--steps', 'many'], '--steps many: expected a number'),
])
def test_bad_arguments_exit_2_naming_them(tmp_path, argv, message):
  code, out = run_campaign(tmp_path, '--tasks', 'dmc_walker_walk', *argv)
  assert code == 2 and message in out and 'Traceback' not in out, out
  assert not (tmp_path / 'runs').exists()
  assert campaign.METHODS['dreamer_cpu'] == ['--preset', 'cpu']


def test_paused_seconds_count_the_pauses_inside_a_stretch():
  log = '\n'.join(['2026-01-01T10:00:00 STOP', '2026-01-01T10:00:30 CONT',  # 30 s, before the stretch's start
                   'not a line', '2026-01-01T10:01:50 STOP', '2026-01-01T10:02:10 CONT',  # 10 s of it inside
                   '2026-01-01T10:05:00 STOP', '2026-01-01T10:05:05 STOP',  # a second STOP changes nothing
                   '2026-01-01T10:06:00 CONT', '2026-01-01T10:06:30 CONT',  # 60 s; a CONT without STOP: nothing
                   '2026-01-01T10:09:00 STOP'])  # Still paused at the end: 60 s.
  at = lambda clock: campaign.datetime.datetime.fromisoformat(f'2026-01-01T{clock}')
  assert campaign.paused_seconds(log, at('10:02:00'), at('10:10:00')) == 10 + 60 + 60
  assert campaign.paused_seconds(log, at('10:00:10'), at('10:00:20')) == 10
  assert campaign.paused_seconds('', at('10:00:00'), at('10:10:00')) == 0


@pytest.mark.e2e
def test_pause_stops_the_campaign_and_its_run_and_run_json_counts_the_pause(tmp_path):
  import os
  import time
  outdir = tmp_path / 'runs'
  process = subprocess.Popen(
      [sys.executable, str(ROOT / 'campaign.py'), '--outdir', str(outdir), '--tasks', 'dmc_walker_walk', '--methods',
       TINY, '--steps', '400', '--eval_episodes', '1'], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  pause = lambda *flag: subprocess.run([sys.executable, str(ROOT / 'campaign.py'), '--outdir', str(outdir), *flag],
                                       capture_output=True, text=True, timeout=60)
  state = lambda pid: pathlib.Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0]
  try:
    deadline = time.time() + 120
    while 'run' not in (campaign.read_json(outdir / campaign.PIDS) or {}) and time.time() < deadline:
      time.sleep(0.2)
    time.sleep(3)  # Into the run's training.
    pids = campaign.read_json(outdir / campaign.PIDS)
    assert pids['campaign'] == process.pid
    result = pause('--pause')
    assert result.returncode == 0 and 'Paused' in result.stdout, result.stdout + result.stderr
    time.sleep(0.5)
    assert state(pids['campaign']) == 'T' and state(pids['run']) == 'T'
    time.sleep(3)
    result = pause('--resume')
    assert result.returncode == 0, result.stderr
    time.sleep(0.5)
    assert state(pids['run']) != 'T' and state(pids['campaign']) != 'T'
    out, _ = process.communicate(timeout=600)
  finally:
    process.kill()
  assert process.returncode == 0, out[-3000:]
  info = json.loads((outdir / 'dmc_walker_walk' / 'tiny' / '0' / 'run.json').read_text())
  [stretch] = info['stretches']
  assert 3 <= stretch['paused_seconds'] < 5 and stretch['paused_seconds'] < stretch['seconds'], stretch
  assert [line.split()[1] for line in (outdir / campaign.PAUSES).read_text().splitlines()] == ['STOP', 'CONT']
  assert not (outdir / campaign.PIDS).exists()  # Gone with the campaign.
  # Nothing to pause now: a clear error, exit 2.
  result = pause('--pause')
  assert result.returncode == 2 and 'no campaign is running' in result.stderr and 'Traceback' not in result.stderr
