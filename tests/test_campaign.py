"""campaign.py: a campaign of real tiny runs trains, evaluates and copies each run's small files; started again it
skips what is done, resumes a run whose logdir is lost from nothing (and says so), and stops a limited method at
the wall time of the others."""

import json
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
  assert (tmp_path / 'copy' / 'dmc_walker_walk' / 'limited' / '3' / 'eval.json').exists()

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
