"""The reference's variables.pkl: same structure, outputs reproduced, safe and atomic files, clear errors."""

import functools
import hashlib
import json
import os
import pathlib
import pickle
import re

import numpy as np
import pytest
from gymnasium import spaces


import compare
import tools
from helpers import DATA, WALKER, build_agent as build, read_order, resolve, run_cli


def reference_dirs():
  dirs = sorted(p for p in (DATA / 'reference').iterdir() if p.is_dir())
  extra = os.environ.get('DREAMER_REFERENCE_DIRS', '')
  dirs += [pathlib.Path(p) for p in extra.split(':') if p]
  return dirs


@pytest.fixture(scope='module')
def forward_outputs():
  """The port's forward outputs per reference folder (compare.run_forward), computed once for this module."""
  return functools.cache(compare.run_forward)


@pytest.mark.xdist_group('forward_outputs')
@pytest.mark.parametrize('directory', reference_dirs(), ids=lambda p: p.name)
def test_reference_outputs_reproduced(directory, forward_outputs):
  rows = compare.forward_rows(*forward_outputs(directory))
  assert len(rows) == sum(k.startswith('out/') for k in np.load(directory / 'refs.npz').files), rows
  assert rows, 'refs.npz has no out/* arrays'
  failed = [row for row in rows if not row.ok]
  assert not failed, failed


@pytest.mark.xdist_group('forward_outputs')
def test_a_departing_forward_output_fails_and_is_named(forward_outputs):
  """The comparison fails on a reference moved by 1e-3 (absolute for values within 1, relative above), and on an
  output the port does not compute; every other output still passes."""
  refs, ours = forward_outputs(WALKER)
  refs = dict(refs)
  refs['out/embed'] = refs['out/embed'] + 1e-3
  large = refs['out/decoder_logprob_of_images']
  assert np.abs(large).min() > 100  # Compared relative to its size.
  refs['out/decoder_logprob_of_images'] = large * (1 + 1e-4)
  ours = {k: v for k, v in ours.items() if k != 'out/reward_mode'}
  failed = [row.name for row in compare.forward_rows(refs, ours) if not row.ok]
  assert failed == ['out/decoder_logprob_of_images', 'out/embed', 'out/reward_mode'], failed


CASES = {
    'default': ([], spaces.Box(-1, 1, (6,))),
    'pcont': (['--pcont', 'True'], spaces.Box(-1, 1, (6,))),
    'onehot': (['--action_dist', 'onehot', '--expl', 'epsilon_greedy'], spaces.Discrete(4)),
    'onehot_score': (['--action_dist', 'onehot_score', '--expl', 'epsilon_greedy'], spaces.Discrete(4)),
}
ORDER = dict(onehot_score='onehot')  # The score-function actor has the straight-through actor's variables.


@pytest.mark.parametrize('name', list(CASES))
def test_written_checkpoint_has_the_reference_structure(name, tmp_path):
  argv, actspace = CASES[name]
  agent = build(argv, actspace)
  table = agent.checkpoint_table()
  expected = read_order(ORDER.get(name, name))
  # Entry by entry, the same names in the same order as the reference's variable table.
  assert len(table) == len(expected), (len(table), len(expected))
  for (index, want, _, _), (got, _) in zip(expected, table):
    assert got == want, f'entry {index}: the port has {got}, the reference {want}'
  # Each name denotes the variable stored under it, and no variable is stored twice.
  for port_name, var in table:
    assert resolve(agent, port_name) is var, port_name
  assert len({id(var) for _, var in table}) == len(table)
  agent.save(tmp_path / 'variables.pkl', 1234)
  values = tools.read_checkpoint(tmp_path / 'variables.pkl')
  assert values[0] == 1234  # The step the loop passes.
  assert len(values) == len(expected)
  for value, (index, want, shape, dtype) in zip(values, expected):
    assert value.shape == shape and value.dtype == np.dtype(dtype), (index, want, value.shape, shape)
  with open(tmp_path / 'variables.pkl', 'rb') as f:
    assert isinstance(pickle.load(f), tuple)  # The reference's loader maps over a tuple.


def test_round_trip_restores_every_weight(tmp_path):
  first = build([], spaces.Box(-1, 1, (6,)))
  first.save(tmp_path / 'variables.pkl', 0)
  second = build(['--seed', '1'], spaces.Box(-1, 1, (6,)))
  differs = [n for (n, a), (_, b) in zip(first.checkpoint_table(), second.checkpoint_table())
             if not np.array_equal(a.numpy(), b.numpy())]
  assert differs  # Fresh initializations differ...
  second.load(tmp_path / 'variables.pkl')
  for (name, a), (_, b) in zip(first.checkpoint_table(), second.checkpoint_table()):
    np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=name)  # ...and loading makes them equal.


@pytest.mark.parametrize('argv, message', [
    (['--pcont', 'True'], '--pcont'),  # Another number of arrays.
    (['--deter_size', '100'], r'entry 1 \(_actor/h0/kernel\).*\(130, 400\).*\(230, 400\)'),  # Another shape.
], ids=['count', 'shape'])
def test_loading_a_different_config_assigns_nothing(argv, message):
  agent = build(argv, spaces.Box(-1, 1, (6,)))
  before = [v.numpy().copy() for _, v in agent.checkpoint_table()]
  with pytest.raises(tools.CheckpointError, match=message):
    agent.load(WALKER / 'variables.pkl')
  for value, (name, var) in zip(before, agent.checkpoint_table()):
    np.testing.assert_array_equal(value, var.numpy(), err_msg=name)


def test_save_is_atomic(tmp_path, monkeypatch):
  agent = build([], spaces.Box(-1, 1, (6,)))
  path = tmp_path / 'variables.pkl'
  agent.save(path, 0)
  digest = hashlib.sha256(path.read_bytes()).hexdigest()

  def crash(*args, **kwargs):  # The new file's bytes are written, but it never reaches the disk whole.
    raise OSError('disk full')
  monkeypatch.setattr(tools.os, 'fsync', crash)
  with pytest.raises(OSError, match='disk full'):
    agent.save(path, 10)
  assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
  tools.read_checkpoint(path)


class Exploit:
  def __reduce__(self):
    return (os.system, (f'touch {self.target}',))


def bad_files(tmp_path):
  truncated = tmp_path / 'truncated.pkl'
  truncated.write_bytes((WALKER / 'variables.pkl').read_bytes()[:100000])
  dict_file = tmp_path / 'dict.pkl'
  dict_file.write_bytes(pickle.dumps({'a': np.zeros(3)}))
  exploit = tmp_path / 'exploit.pkl'
  Exploit.target = str(tmp_path / 'pwned')
  exploit.write_bytes(pickle.dumps((Exploit(),)))
  return {'missing': (tmp_path / 'nope.pkl', 'does not exist'), 'truncated': (truncated, 'unreadable'),
          'dict': (dict_file, 'holds a dict'), 'exploit': (exploit, 'refuses')}


@pytest.mark.parametrize('kind', ['missing', 'truncated', 'dict', 'exploit'])
def test_bad_checkpoint_files_exit_2(tmp_path, kind):
  path, message = bad_files(tmp_path)[kind]
  code, _, err = run_cli('--logdir', str(tmp_path / 'out'), '--checkpoint', str(path), '--eval_only', 'True')
  assert code == 2, err[-2000:]
  assert message in err and len(err.strip().splitlines()) == 1, err[-2000:]  # One line, no traceback.
  assert not (tmp_path / 'pwned').exists()
  assert not (tmp_path / 'out' / 'eval.json').exists()


def test_checkpoint_of_other_config_exits_2_and_keeps_existing_checkpoint(tmp_path):
  logdir = tmp_path / 'run'
  logdir.mkdir()
  existing = logdir / 'variables.pkl'
  existing.write_bytes((WALKER / 'variables.pkl').read_bytes())
  digest = hashlib.sha256(existing.read_bytes()).hexdigest()
  code, _, err = run_cli('--logdir', str(logdir), '--eval_only', 'True', '--pcont', 'True',
                         '--time_limit', '20')
  assert code == 2 and '--pcont' in err
  assert hashlib.sha256(existing.read_bytes()).hexdigest() == digest


@pytest.mark.e2e
def test_eval_only_on_the_original_checkpoint(tmp_path):
  out = tmp_path / 'eval'
  code, stdout, stderr = run_cli('--logdir', str(out), '--task', 'dmc_walker_walk', '--checkpoint',
                                 str(WALKER / 'variables.pkl'), '--eval_only', 'True', '--eval_episodes', '2',
                                 '--time_limit', '100')  # In this process: TensorFlow is imported already.
  assert code == 0, stdout[-2000:] + stderr[-2000:]
  data = json.loads((out / 'eval.json').read_text())
  assert set(data) == {'task', 'checkpoint', 'step', 'returns', 'mean', 'std'}
  assert data['task'] == 'dmc_walker_walk' and len(data['returns']) == 2
  assert data['step'] == int(tools.read_checkpoint(WALKER / 'variables.pkl')[0])
  assert np.isclose(data['mean'], np.mean(data['returns'])) and np.isclose(data['std'], np.std(data['returns']))
  assert all(0 <= r <= 50 for r in data['returns'])  # 50 agent steps, rewards in [0, 1] per env step.
  assert (out / 'eval_video.gif').read_bytes()[:4] == b'GIF8'
  assert f'{data["mean"]:.1f}' in stdout
  assert not (out / 'episodes').exists()  # Nothing added to any replay store.


@pytest.mark.e2e
def test_compare_command_exit_codes(tmp_path, capsys):
  assert compare.main([str(WALKER)]) == 0  # In this process: the command's exit code is main's return value.
  out = capsys.readouterr().out
  assert 'out/kl_post_prior' in out and 'FAIL' not in out, out
  # A directory whose reference outputs were altered fails with exit code 1 and names the output.
  broken = tmp_path / 'broken'
  broken.mkdir()
  for name in ('variables.pkl', 'config.json'):
    (broken / name).symlink_to(WALKER / name)
  refs = dict(np.load(WALKER / 'refs.npz'))
  refs['out/value_mode'] = refs['out/value_mode'] + 1e-3
  np.savez(broken / 'refs.npz', **refs)
  assert compare.main([str(broken)]) == 1
  out = capsys.readouterr().out
  assert re.search(r'out/value_mode .*FAIL', out), out
