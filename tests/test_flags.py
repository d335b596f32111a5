"""The flags' one source (flags.FLAGS): parsing, checks, --help without TensorFlow, the README's table."""

import argparse
import json
import pathlib
import subprocess
import sys

import pytest

import flags
import models
from helpers import ROOT


def test_readme_flags_table_is_the_source():
  readme = (ROOT / 'README.md').read_text()
  assert flags.readme_with_table(readme) == readme, 'README flags table is stale: run `python flags.py --readme`'
  for flag in flags.FLAGS:
    assert f'| `--{flag.name}` |' in readme, flag.name


def test_every_flag_has_one_entry_with_a_default_of_its_type():
  names = [flag.name for flag in flags.FLAGS]
  assert len(names) == len(set(names))
  config = flags.define_config()
  assert list(config) == names
  for flag in flags.FLAGS:
    assert flag.help and not flag.help.endswith('.'), flag.name
    for choice in flag.choices:
      assert type(choice) is type(flag.default), (flag.name, choice)
    assert not flag.choices or flag.default in flag.choices, flag.name
  for layer in list(flags.PRESETS.values()) + list(flags.SUITE_DEFAULTS.values()):
    assert set(layer) <= set(names), set(layer) - set(names)
  assert flags.ACTS == tuple(models.ACTS)


def test_the_defaults_pass_the_checks_and_layers_apply_in_order():
  flags.check_config(flags.parse_args([]))
  config = flags.parse_args(['--task', 'atari_pong', '--preset', 'debug', '--horizon', '7'])
  flags.check_config(config)
  assert config.horizon == 7  # Given flags win over the preset (3) and the suite (10).
  assert config.deter_size == 16 and config.action_repeat == 4 and config.preset == 'debug'
  assert type(config.expl_decay) is float and config.expl_decay == 3e6
  # The debug preset is a smoke run that ends by itself (about half a minute), on DMC and Atari alike.
  for task in ('dmc_walker_walk', 'atari_pong'):
    assert flags.parse_args(['--task', task, '--preset', 'debug']).steps == 500
  assert flags.parse_args(['--preset', 'debug', '--steps', '1e4']).steps == 10000


@pytest.mark.parametrize('argv, message', [
    (['--steps', '0'], '--steps must be positive, got 0.'),
    (['--cpu_devices', '-1'], '--cpu_devices must be at least 0, got -1.'),
    (['--batch_length', '1'], '--batch_length must be at least 2, got 1.'),
    (['--parallel', 'gpu'], '--parallel gpu is not allowed; choose one of: none, thread, process.'),
    (['--precision', '8'], '--precision 8 is not allowed; choose one of: 16, 32.'),
    (['--task', 'foo_cartpole'], 'Unknown suite in --task foo_cartpole'),
    (['--task', 'gym_cartpole'], "Unknown Gymnasium id 'cartpole' in task 'gym_cartpole'"),
    (['--expl', 'epsilon_greedy'], '--expl epsilon_greedy does not fit the continuous actions of dmc_walker_walk; '
     'use --expl additive_gaussian or --expl completely_random.'),
    (['--task', 'atari_pong', '--action_dist', 'tanh_normal'], '--action_dist tanh_normal does not fit the '
     'discrete actions of atari_pong; use --action_dist onehot or --action_dist onehot_score.'),
    (['--eval_every', '1'], 'is less than one agent step'),
    (['--time_limit', '20'], 'no training window would fit'),
    # The ablation variants (tests/test_variants.py has the rest of their tests).
    (['--value_estimate', 'nstep', '--nstep', '0'], '--nstep 0 is not a number of imagined steps'),
    (['--value_estimate', 'nstep', '--nstep', '16'], '--nstep 16 is not a number of imagined steps of --horizon 15'),
    (['--nstep', '-1'], '--nstep must be at least 0'),
    (['--value_estimate', 'td'], '--value_estimate td is not allowed; choose one of: lambda, nstep, reward.'),
    (['--behavior', 'mpc'], '--behavior mpc is not allowed'),
    (['--representation', 'pixels'], '--representation pixels is not allowed'),
    (['--behavior', 'cem', '--value_estimate', 'reward'], '--value_estimate reward does nothing under --behavior cem'),
    (['--behavior', 'cem', '--cem_candidates', '50'], '--cem_topk 100 is more than --cem_candidates 50'),
    (['--behavior', 'cem', '--cem_iterations', '0'], '--cem_iterations must be positive'),
    (['--task', 'atari_pong', '--behavior', 'cem'], '--behavior cem needs continuous actions'),
])
def test_bad_values_exit_2_naming_the_flag(argv, message, capsys):
  with pytest.raises(SystemExit) as exit_:
    flags.parse_and_check(argv)
  assert exit_.value.code == 2
  err = capsys.readouterr().err
  assert message in err and 'Traceback' not in err, err


@pytest.mark.parametrize('argv', [['--help'], ['--steps', 'many'], ['--steps', '0']])
def test_help_and_flag_errors_do_not_import_tensorflow(argv):
  # -X importtime lists every module the process imported, on stderr.
  result = subprocess.run([sys.executable, '-X', 'importtime', str(ROOT / 'dreamer.py'), *argv],
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == (0 if argv == ['--help'] else 2), result.stderr[-2000:]
  imported = {line.split('|')[-1].strip() for line in result.stderr.splitlines() if line.startswith('import time:')}
  assert 'numpy' in imported  # The listing works.
  assert not {'tensorflow', 'keras', 'tensorflow_probability'} & imported
  if argv == ['--help']:
    assert '--expl_schedule' in result.stdout and '(default: 5e6)' in result.stdout


# args_type -----------------------------------------------------------------------------------------------------------

def test_args_type_bool_is_strict():
  parse = flags.args_type(True)
  assert parse('True') is True and parse('False') is False
  for text in ('true', 'false', '1', '0', 'yes', ''):
    with pytest.raises(argparse.ArgumentTypeError):
      parse(text)


def test_args_type_int_accepts_scientific_whole_numbers():
  parse = flags.args_type(5)
  value = parse('5e6')
  assert value == 5000000 and type(value) is int
  assert parse('7') == 7 and parse('-3') == -3 and parse('1e4') == 10000
  for text in ('0.5', 'abc', '1.5e0', 'inf', 'nan', ''):
    with pytest.raises(argparse.ArgumentTypeError):
      parse(text)


def test_args_type_float_path_and_str(tmp_path, monkeypatch):
  assert flags.args_type(1.0)('1e-3') == 0.001
  monkeypatch.setenv('HOME', str(tmp_path))
  path = flags.args_type(pathlib.Path('.'))('~/logdir')
  assert isinstance(path, pathlib.Path) and path == tmp_path / 'logdir'
  assert flags.args_type('dmc_walker_walk')('atari_pong') == 'atari_pong'


def test_args_type_in_argparse(capsys):
  parser = argparse.ArgumentParser()
  parser.add_argument('--steps', type=flags.args_type(5), default=5)
  parser.add_argument('--pcont', type=flags.args_type(False), default=False)
  config = parser.parse_args(['--steps', '1e3', '--pcont', 'True'])
  assert config.steps == 1000 and config.pcont is True
  with pytest.raises(SystemExit):
    parser.parse_args(['--steps', '0.5'])
  assert '0.5' in capsys.readouterr().err


def test_resume_reports_a_flag_newer_than_the_runs_config_json(tmp_path, capsys):
  # A run whose config.json older code wrote, without a flag added since: that run had the flag's default. A
  # resume at another value (here the cpu preset's one thread per op) says so; at the default it says nothing.
  config = flags.parse_args(['--logdir', str(tmp_path)])
  config.logdir = tmp_path
  saved = {k: str(v) if k == 'logdir' else v for k, v in config.items() if k != 'intra_op_threads'}
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  flags.check_resume(config, has_data=True)
  assert 'Resuming with changed flags' not in capsys.readouterr().out
  config.intra_op_threads = 1
  flags.check_resume(config, has_data=True)
  assert '--intra_op_threads 0 (the default: its config.json has no such flag) -> 1' in capsys.readouterr().out
