"""plotting.py on synthetic runs plus the shipped scores: the figure exists and the table is right."""

import csv
import json

import numpy as np
import pytest


import plotting
from helpers import ROOT


def write_run(indir, task, method, seed, points, evaluation=None, junk=False, eval_step=None):
  folder = indir / task / method / str(seed)
  folder.mkdir(parents=True)
  lines = [json.dumps({'step': s, 'test/return': r, 'test/length': 500, 'episodes': 1}) for s, r in points]
  lines.insert(1, json.dumps({'step': 1, 'model_loss': 3.0}))  # Lines without the key are ignored.
  if junk:
    lines.append('{"step": 9')  # A partial last line, as a killed run may leave.
  (folder / 'metrics.jsonl').write_text('\n'.join(lines) + '\n')
  if evaluation is not None:
    step = {} if eval_step is None else {'step': eval_step}
    (folder / 'eval.json').write_text(json.dumps({**step, 'mean': evaluation, 'returns': [evaluation]}))


def paper(task):
  runs = [r for r in json.loads((ROOT / 'scores' / 'dreamer.json').read_text()) if r['task'] == task]
  xs = sorted({x for r in runs for x in r['xs']})
  means = [np.mean([y for r in runs for rx, y in zip(r['xs'], r['ys']) if rx == x]) for x in xs]
  return (lambda step: np.interp(step, xs, means)), np.mean([r['ys'][-1] for r in runs])


def test_plot_and_table_from_synthetic_runs(tmp_path, capsys):
  indir, outdir = tmp_path / 'logdir', tmp_path / 'plots'
  grid = [5000, 55000, 105000, 155000, 205000]
  write_run(indir, 'dmc_walker_walk', 'port', 0, list(zip(grid, [10, 20, 30, 40, 50])), 44.0)  # No step: no point.
  write_run(indir, 'dmc_walker_walk', 'port', 1, list(zip(grid + [240000], [0, 10, 60, 70, 80, 999])), junk=True)
  write_run(indir, 'dmc_cheetah_run', 'port', 0, [(5000, 1), (105000, 100)])
  write_run(indir, 'dmc_cheetah_run', 'port', 1, [(5000, 7), (25000, 3)])  # Unfinished: not in the final mean.
  assert plotting.main(['--indir', str(indir), '--outdir', str(outdir)]) == 0
  printed = capsys.readouterr()
  assert 'not JSON' in printed.err
  for name in ('curves.png', 'curves.pdf'):
    assert (outdir / name).stat().st_size > 10000
  assert (outdir / 'curves.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  rows = {r['task']: r for r in csv.DictReader((outdir / 'returns.csv').open())}
  walker_at, walker_final = paper('dmc_walker_walk')
  cheetah_at, cheetah_final = paper('dmc_cheetah_run')
  walker = rows['dmc_walker_walk']
  # Bins of 1e5 steps from the first point, (x - 1e5, x]: seed 0 ends with mean(40, 50) = 45 at 205000, seed 1
  # with mean(70, 80) = 75 (its point at 240000 is past its last bin).
  assert float(walker['final']) == 60.0 and walker['seeds'] == '2' and walker['step'] == '205000'
  assert float(walker['eval']) == 44.0
  assert abs(float(walker['paper_same_step']) - walker_at(205000)) < 0.05
  assert abs(float(walker['paper_final']) - walker_final) < 0.05
  cheetah = rows['dmc_cheetah_run']
  assert float(cheetah['final']) == 100.0 and cheetah['eval'] == '' and cheetah['seeds'] == '1'
  assert abs(float(cheetah['paper_same_step']) - cheetah_at(105000)) < 0.05
  # The average is over the tasks at the method's furthest step: cheetah (at 105000) is left out, and named.
  average = rows['average (1 task)']
  assert float(average['final']) == 60.0 and average['step'] == '205000' and average['seeds'] == '2'
  assert abs(float(average['paper_final']) - walker_final) < 0.05
  assert 'Not in the average of port: dmc_cheetah_run, at step 105000' in printed.out
  assert '| dmc_walker_walk | port | 2 | 205000 | 60.0 | 44.0 |' in (outdir / 'returns.md').read_text()
  # Tasks at the same step average together; each method has its own average.
  write_run(indir, 'dmc_cheetah_run', 'port', 2, [(5000, 1), (105000, 80), (205000, 140)])
  write_run(indir, 'dmc_walker_walk', 'other', 0, [(5000, 1), (105000, 30)], 33.0)
  assert plotting.main(['--indir', str(indir), '--outdir', str(outdir)]) == 0
  rows = {(r['task'], r['method']): r for r in csv.DictReader((outdir / 'returns.csv').open())}
  average = rows[('average (2 tasks)', 'port')]
  assert float(average['final']) == (60.0 + 140.0) / 2 and average['step'] == '205000' and average['seeds'] == '3'
  assert abs(float(average['paper_same_step']) - (walker_at(205000) + cheetah_at(205000)) / 2) < 0.05
  assert abs(float(average['paper_final']) - (walker_final + cheetah_final) / 2) < 0.05
  # A run whose tests came a few steps later (its bins end at 205008) is at the same step.
  write_run(indir, 'dmc_pendulum_swingup', 'port', 0, [(5008, 0), (105008, 10), (205008, 20)])
  assert plotting.main(['--indir', str(indir), '--outdir', str(outdir)]) == 0
  rows = {(r['task'], r['method']): r for r in csv.DictReader((outdir / 'returns.csv').open())}
  assert rows[('dmc_pendulum_swingup', 'port')]['step'] == '205008'
  assert abs(float(rows[('average (3 tasks)', 'port')]['final']) - (60.0 + 140.0 + 20.0) / 3) < 0.05
  other = rows[('average (1 task)', 'other')]
  assert float(other['final']) == 30.0 and float(other['eval']) == 33.0 and other['step'] == '105000'


def test_filters_and_missing_runs(tmp_path):
  indir = tmp_path / 'logdir'
  write_run(indir, 'dmc_walker_walk', 'port', 0, [(0, 10), (100000, 30)])
  write_run(indir, 'dmc_cheetah_run', 'port', 0, [(0, 1)])
  assert plotting.main(['--indir', str(indir), '--outdir', str(tmp_path / 'a'), '--tasks', 'dmc_walker_*',
                        '--band', 'std', '--bins', '5e4']) == 0
  rows = list(csv.DictReader((tmp_path / 'a' / 'returns.csv').open()))
  assert [r['task'] for r in rows] == ['dmc_walker_walk', 'average (1 task)']
  assert plotting.main(['--indir', str(tmp_path / 'empty'), '--outdir', str(tmp_path / 'b')]) == 2


def test_binning_is_the_references_and_keeps_the_papers_published_points():
  # The first point alone, then (x - width, x] at labels every width after it; points past the last label left out.
  labels, means = plotting.binning([0, 50, 100, 150], [1.0, 3.0, 5.0, 7.0], 100)
  assert list(labels) == [0, 100] and list(means) == [1.0, 4.0]
  labels, means = plotting.binning([0, 50, 100, 150, 191], [1.0, 3.0, 5.0, 7.0, 9.0], 100)  # 191: near enough.
  assert list(labels) == [0, 100, 200] and list(means) == [1.0, 4.0, 8.0]
  labels, means = plotting.binning([0, 50, 100, 150, 189], [1.0, 3.0, 5.0, 7.0, 9.0], 100)
  assert list(labels) == [0, 100]
  # A test episode every 1e4 steps from 5,000 and a run stopped at 104,000: the paper's bins of 1e5.
  xs = [5000 + 10000 * k for k in range(10)] + [104000]
  labels, means = plotting.binning(xs, np.arange(11.0), 1e5)
  assert list(labels) == [5000, 105000] and list(means) == [0.0, 5.5]
  # Binning the published curves at their own width or finer gives them back at their own steps.
  paper_runs, _ = plotting.load_paper(ROOT / 'scores')
  walker = [r for r in paper_runs if r.task == 'dmc_walker_walk']
  for width in (1e4, 1e5):
    xs, mean, low, high = plotting.curve(walker, width)
    at = {x: [y for r in walker for rx, y in zip(r.xs, r.ys) if rx == x] for x in xs}
    assert list(xs) == sorted({x for r in walker for x in r.xs})
    np.testing.assert_allclose(mean, [np.mean(at[x]) for x in xs])
    np.testing.assert_allclose(high, [np.max(at[x]) for x in xs])


def test_curve_over_seeds():
  runs = [plotting.Run('t', 'm', str(i), np.array([0, 100.0]), np.array(ys), None)
          for i, ys in enumerate([[1.0, 2.0], [3.0, 6.0]])]
  xs, mean, low, high = plotting.curve(runs, 100)
  assert list(mean) == [2.0, 4.0] and list(low) == [1.0, 2.0] and list(high) == [3.0, 6.0]
  xs, mean, low, high = plotting.curve(runs, 100, band='std')
  assert list(high - mean) == [1.0, 2.0]


def test_horizon_figure_reads_the_horizon_from_each_runs_config(tmp_path, capsys):
  indir, outdir = tmp_path / 'horizons', tmp_path / 'plots'
  # Two seeds at horizon 10, one at 20 for dreamer; no_value at 10; a run without config.json is left out.
  for method, name, horizon, final in (('dreamer', 'h10_s0', 10, 100), ('dreamer', 'h10_s1', 10, 200),
                                       ('dreamer', 'h20_s0', 20, 400), ('no_value', 'h10_s0', 10, 50),
                                       ('no_value', 'unknown', None, 999)):
    write_run(indir, 'dmc_walker_walk', method, name, [(0, 0), (100000, final)])
    if horizon:
      (indir / 'dmc_walker_walk' / method / name / 'config.json').write_text(json.dumps({'horizon': horizon}))
  assert plotting.main(['--indir', str(indir), '--outdir', str(outdir), '--figure', 'horizon']) == 0
  assert (outdir / 'horizon.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  rows = [(r['method'], r['horizon'], r['seeds'], r['final'], r['low'], r['high'])
          for r in csv.DictReader((outdir / 'horizon.csv').open())]
  assert rows == [('dreamer', '10', '2', '150.0', '100.0', '200.0'), ('dreamer', '20', '1', '400.0', '400.0', '400.0'),
                  ('no_value', '10', '1', '50.0', '50.0', '50.0')]
  assert '| dmc_walker_walk | dreamer | 20 | 1 | 400.0 |' in capsys.readouterr().out
  write_run(tmp_path / 'none', 'dmc_walker_walk', 'dreamer', 0, [(0, 1)])
  assert plotting.main(['--indir', str(tmp_path / 'none'), '--outdir', str(outdir), '--figure', 'horizon']) == 2


def stratified_bootstrap(per_task, statistic, resamples, rng):
  """By hand: each resample draws every task's scores from that task's own, with replacement."""
  values = []
  for _ in range(resamples):
    drawn = np.concatenate([rng.choice(v, len(v)) for _, v in sorted(per_task.items())])
    values.append(statistic(drawn))
  return np.percentile(values, [2.5, 97.5])


def iqm(scores):
  """The mean of the middle half of the sorted scores (for 8 scores: the 3rd to 6th)."""
  scores = np.sort(scores)
  n = len(scores)
  return scores[n // 4:n - n // 4].mean()


def test_aggregate_intervals_are_stratified_bootstraps_of_the_iqm(tmp_path):
  """Two tasks far apart, four seeds each: the interval is the stratified one (a bootstrap over the pooled runs,
  whose resamples mix the tasks in other proportions, is wider)."""
  rng = np.random.RandomState(0)
  per_task = {'dmc_a': 0.8 + 0.1 * rng.rand(4), 'dmc_b': 0.1 + 0.1 * rng.rand(4)}
  point, low, high = plotting.interval(per_task, 'IQM', resamples=4000)
  pooled = np.concatenate(list(per_task.values()))
  assert point == pytest.approx(iqm(pooled), abs=1e-12)
  expected = stratified_bootstrap(per_task, iqm, 4000, np.random.RandomState(1))
  np.testing.assert_allclose([low, high], expected, atol=0.01)
  unstratified = stratified_bootstrap({'all': pooled}, iqm, 4000, np.random.RandomState(1))
  assert unstratified[1] - unstratified[0] > 1.5 * (high - low), (unstratified, low, high)
  assert plotting.interval({'dmc_a': [0.5], 'dmc_b': [0.25]}, 'mean') == (0.375, 0.375, 0.375)  # Nothing to draw.
  # A task with one run (the others' unfinished) takes part in every resample as that run.
  per_task = {'dmc_a': [0.9], 'dmc_b': 0.1 + 0.1 * rng.rand(4)}
  point, low, high = plotting.interval(per_task, 'mean', resamples=4000)
  expected = stratified_bootstrap(per_task, np.mean, 4000, np.random.RandomState(1))
  assert point == pytest.approx(np.mean(np.concatenate([[0.9], per_task['dmc_b']])), abs=1e-12)
  np.testing.assert_allclose([low, high], expected, atol=0.01)


def test_aggregate_figure_from_runs_and_the_paper(tmp_path, capsys):
  indir, outdir = tmp_path / 'runs', tmp_path / 'plots'
  for seed, final in enumerate([300.0, 500.0]):
    # The evaluation at 105,000 is the last point of the bin (5000, 105000]: (40 + final) / 2.
    write_run(indir, 'dmc_walker_walk', 'port', seed, [(5000, 10), (95000, 40)], final, eval_step=105000)
    write_run(indir, 'dmc_cheetah_run', 'port', seed, [(5000, 1), (105000, 100 + 100 * seed)])
  write_run(indir, 'dmc_cheetah_run', 'port', 2, [(5000, 900), (45000, 900)])  # Unfinished: left out.
  assert plotting.main(['--indir', str(indir), '--outdir', str(outdir), '--figure', 'aggregate']) == 0
  assert (outdir / 'aggregate.png').stat().st_size > 10000 and (outdir / 'aggregate.pdf').exists()
  rows = {row['method']: row for row in csv.DictReader((outdir / 'aggregate.csv').open())}
  assert set(rows) == {'port', plotting.PAPER}
  port = rows['port']
  assert (port['runs'], port['tasks'], port['step']) == ('4', '2', '105000')
  assert float(port['mean']) == pytest.approx(np.mean([0.17, 0.27, 0.1, 0.2]), abs=1e-3)
  assert float(port['IQM']) == pytest.approx(iqm([0.17, 0.27, 0.1, 0.2]), abs=1e-3)
  assert float(port['IQM_low']) <= float(port['IQM']) <= float(port['IQM_high'])
  # The paper: its five seeds per task at 1.05e5.
  scores = json.loads((ROOT / 'scores' / 'dreamer.json').read_text())
  at = [r['ys'][r['xs'].index(105000.0)] / 1000 for r in scores if r['task'] in ('dmc_walker_walk', 'dmc_cheetah_run')]
  assert rows[plotting.PAPER]['runs'] == '10'
  assert float(rows[plotting.PAPER]['mean']) == pytest.approx(np.mean(at), abs=1e-3)
  out = capsys.readouterr().out
  assert '| port | 4 | 2 | 105000 |' in out
  assert 'Left out (short of step 105000): dmc_cheetah_run/port/2, its last bin at 5000.' in out, out
  assert 'Note' not in out  # Two runs on each task.
  write_run(indir, 'dmc_walker_walk', 'port', 3, [(7000, 10), (107000, 400)])  # Bins 2,000 steps later: counts.
  assert plotting.main(['--indir', str(indir), '--outdir', str(outdir), '--figure', 'aggregate']) == 0
  rows = {row['method']: row for row in csv.DictReader((outdir / 'aggregate.csv').open())}
  assert rows['port']['runs'] == '5'
  assert 'Note: port has dmc_cheetah_run: 2, dmc_walker_walk: 3 runs' in capsys.readouterr().out


def test_times_table_gives_each_campaign_run_its_hours_net_of_pauses_and_its_machines(tmp_path, capsys):
  indir, outdir = tmp_path / 'runs', tmp_path / 'plots'
  write_run(indir, 'dmc_walker_walk', 'dreamer_cpu', 0, [(0, 10), (20000, 50)])
  write_run(indir, 'dmc_cheetah_run', 'dreamer_cpu', 0, [(0, 1), (5000, 2)])  # No run.json: not a campaign's.
  stretches = [dict(start='2026-01-01T10:00:00', steps_from=0, steps_to=12000, seconds=4000.0, device='CPU A',
                    precision='mixed_bfloat16', code='abc1234'),  # Before pauses were counted: none.
               dict(start='2026-01-01T12:00:00', steps_from=12000, steps_to=20000, seconds=3000.0,
                    paused_seconds=600.0, device='CPU A; 1 thread per op', precision='mixed_bfloat16',
                    code='def5678')]
  (indir / 'dmc_walker_walk' / 'dreamer_cpu' / '0' / 'run.json').write_text(json.dumps(dict(stretches=stretches)))
  assert plotting.main(['--indir', str(indir), '--outdir', str(outdir)]) == 0
  with (outdir / 'times.csv').open() as f:
    [row] = list(csv.DictReader(f))
  assert (row['task'], row['method'], row['seed'], row['steps']) == ('dmc_walker_walk', 'dreamer_cpu', '0', '20000')
  assert float(row['hours']) == pytest.approx((4000 + 3000 - 600) / 3600, abs=0.005)
  assert float(row['paused_hours']) == pytest.approx(600 / 3600, abs=0.005)
  assert float(row['steps_per_second']) == pytest.approx(20000 / 6400, abs=0.005)
  assert row['machines'] == 'CPU A + CPU A; 1 thread per op' and row['code'] == 'abc1234 + def5678'
  assert row['precision'] == 'mixed_bfloat16'
  assert 'times.md' in capsys.readouterr().out and (outdir / 'times.md').read_text().count('\n') == 3


def test_runs_table_bins_each_run_like_the_papers_values_and_sets_it_beside_their_range(tmp_path):
  indir, outdir = tmp_path / 'runs', tmp_path / 'plots'
  # Stopped at 104,000 steps; its evaluation is its last point, in the bin (5000, 105000].
  write_run(indir, 'dmc_walker_walk', 'port', 0, [(5000, 30), (15000, 60), (94000, 115)], 700.0, eval_step=104000)
  write_run(indir, 'dmc_walker_walk', 'port', 1, [(5000, 20), (55000, 50), (105000, 150)])  # No eval.json.
  write_run(indir, 'dmc_cheetah_run', 'port', 0, [(5000, 0.1)])
  assert plotting.main(['--indir', str(indir), '--outdir', str(outdir), '--bins', '1e4']) == 0
  with (outdir / 'runs.csv').open() as f:
    rows = {(r['task'], r['seed']): r for r in csv.DictReader(f)}
  seeds = lambda task, step: [np.interp(step, r['xs'], r['ys']) for r in json.loads(
      (ROOT / 'scores' / 'dreamer.json').read_text()) if r['task'] == task]
  expected = [('dmc_walker_walk', '0', 105000, 3, (60 + 115 + 700) / 3, '700.0'),
              ('dmc_walker_walk', '1', 105000, 2, 100.0, ''), ('dmc_cheetah_run', '0', 5000, 1, 0.1, '')]
  for task, seed, step, tests, score, evaluation in expected:
    row, paper = rows[(task, seed)], seeds(task, step)
    assert int(row['step']) == step and int(row['tests']) == tests, row
    assert float(row['score']) == pytest.approx(score, abs=0.05) and row['eval'] == evaluation, row
    assert float(row['paper_mean']) == pytest.approx(np.mean(paper), abs=0.05)
    assert (float(row['paper_min']), float(row['paper_max'])) == pytest.approx((min(paper), max(paper)), abs=0.05)
    label = 'inside' if min(paper) <= score <= max(paper) else ('above' if score > max(paper) else 'below')
    assert row['against_paper'] == label, row
  assert [rows[(t, s)]['against_paper'] for t, s, *_ in expected] == ['above', 'inside', 'below']
  # returns.md sets the same bins beside the paper, whatever --bins draws: the seeds' mean of their last bins.
  returns = {r['task']: r for r in csv.DictReader((outdir / 'returns.csv').open())}
  assert float(returns['dmc_walker_walk']['final']) == pytest.approx(((60 + 115 + 700) / 3 + 100) / 2, abs=0.05)
  assert (outdir / 'runs.md').exists()
