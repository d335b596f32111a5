"""Learning curves against the paper's, and a table of final returns.

Runs are read from `<indir>/<task>/<method>/<seed>/metrics.jsonl` (and `eval.json` beside it when present). Each
run's points (`--xkey`, `--ykey`; an `eval.json`'s mean is the test return at its step) are averaged in bins of
`--bins` steps as the reference's plotting.py bins them (the first point alone, then (x - bins, x] every `bins` steps
after it); a method's curve is the mean over seeds with a min-max (or standard-deviation) band. The published Dreamer
curves (`scores/dreamer.json`, bins of 1e5 steps of one test episode every 1e4) are drawn as the method
`dreamer (paper)` and the baselines' final scores (`scores/baselines.json`) as horizontal lines; with `--bins` finer
than the paper's 1e5, each method's runs are also drawn binned as the paper's values (diamonds).

  python plotting.py --indir logdir --outdir plots

The paper's ablations (README, "Ablations"): the variants' curves side by side per task are the same figure with
method folders named after the variants (`dreamer`, `dreamer_nstep`, `no_value`, `planet`, `contrastive`,
`reward_only`) and `--no_paper`; `--figure horizon` draws each method's final return against its imagination
horizon, read from the `config.json` beside each run's metrics (any run folder name, e.g. `h20_s0`), with
`horizon.md` / `horizon.csv` listing the points. `--figure aggregate` sets all runs of each method (and the paper's
seeds on the same tasks, at the recorded step nearest the runs') side by side as interval estimates (Agarwal et al.,
NeurIPS 2021): the interquartile mean, median and mean of the normalized scores (DMC: return / 1000; a run's score
is its last bin, of 1e5 steps beside the paper like the paper's) with 95% stratified bootstrap confidence intervals.
With the curves, `runs.md` / `runs.csv` set each run's last bin of 1e5 steps (binned like the paper's values) and
its eval.json mean beside the paper's seeds at that step (mean, min, max; inside, above or below their range). Runs
that campaign.py ran (a `run.json` beside the metrics) also get `times.md` / `times.csv` with the curves: steps,
hours net of the logged pauses, steps per second, and the machines and code of their stretches.
"""

import argparse
import collections
import csv
import fnmatch
import json
import pathlib
import sys

import numpy as np

SCORES = pathlib.Path(__file__).resolve().parent / 'scores'
PAPER = 'dreamer (paper)'

Run = collections.namedtuple('Run', 'task, method, seed, xs, ys, eval, config, info', defaults=(None, None))


def load_runs(indir, xkey='step', ykey='test/return'):
  """Every `<task>/<method>/<seed>/metrics.jsonl` under indir with at least one point."""
  runs = []
  for path in sorted(pathlib.Path(indir).glob('*/*/*/metrics.jsonl')):
    seed_dir = path.parent
    points = []
    for number, line in enumerate(path.read_text().splitlines()):
      try:
        data = json.loads(line)
      except ValueError:
        print(f'Warning: {path}:{number + 1} is not JSON; skipped.', file=sys.stderr)
        continue
      if xkey in data and ykey in data:
        points.append((float(data[xkey]), float(data[ykey])))
    evaluation = None
    if (seed_dir / 'eval.json').exists():
      evaluation = json.loads((seed_dir / 'eval.json').read_text())
    config = None  # The run's flags (dreamer.py writes them), for the horizon figure.
    if (seed_dir / 'config.json').exists():
      config = json.loads((seed_dir / 'config.json').read_text())
    info = None  # campaign.py's record of the run's stretches, for the times table.
    if (seed_dir / 'run.json').exists():
      info = json.loads((seed_dir / 'run.json').read_text())
    if evaluation and (xkey, ykey) == ('step', 'test/return') and 'step' in evaluation and 'mean' in evaluation:
      # The final checkpoint's evaluation (its episodes' mean) is the run's test return at its step: the last
      # point of its curve and of its last bin, as the paper's test episode at that step is of the paper's.
      if not points or float(evaluation['step']) > max(x for x, _ in points):
        points.append((float(evaluation['step']), float(evaluation['mean'])))
    if points:
      xs, ys = map(np.array, zip(*sorted(points)))
      runs.append(Run(seed_dir.parent.parent.name, seed_dir.parent.name, seed_dir.name, xs, ys, evaluation, config,
                      info))
  return runs


def load_paper(scores=SCORES):
  """Published Dreamer runs as Run tuples, and the baselines {task: {method: score}}."""
  runs = [Run(r['task'], PAPER, str(r['seed']), np.array(r['xs'], float), np.array(r['ys'], float), None)
          for r in json.loads((pathlib.Path(scores) / 'dreamer.json').read_text())]
  baselines = json.loads((pathlib.Path(scores) / 'baselines.json').read_text())
  return runs, baselines


def binning(xs, ys, width):
  """The reference's bins (its plotting.py): the first holds the first point alone, each next one the points in
  (label - width, label], at labels every `width` steps after the first point. Returns the labels of the bins that
  hold points and their means. The published curves are such bins (see PAPER_WIDTH). A last bin whose points come
  within a tenth of a width of its label counts (a run that stopped a test or a few steps short of it); points
  after the last bin are left out, as in the reference."""
  xs, ys = np.asarray(xs, float), np.asarray(ys, float)
  labels = np.arange(xs.min(), xs.max() + 0.1 * width + 1e-9, width)
  starts = np.concatenate([[-np.inf], labels[:-1]])
  kept, means = [], []
  for start, stop in zip(starts, labels):
    inside = (xs > start) & (xs <= stop)
    if inside.any():
      kept.append(stop)
      means.append(ys[inside].mean())
  return np.array(kept), np.array(means)


# scores/dreamer.json's values are bins of 1e5 steps over one test episode every 1e4 (from 5,000): after the first,
# each is the mean of the ten episodes in (x - 1e5, x], not the return at x. Their rounding shows it: 92% of the
# first values (one return each) are multiples of 1/256, but of the values at 1.05e5 and 2.05e5 steps only 23%,
# while 87% are multiples of 1/1280 (means of several such returns; later values are too large to tell). A run is
# set beside them binned the same way (docs/reproduction.md).
PAPER_WIDTH = 1e5


def curve(runs, width, band='minmax'):
  """x, mean, low, high over the seeds of one task and method (bins a seed lacks are ignored)."""
  table = collections.defaultdict(list)
  for run in runs:
    for x, y in zip(*binning(run.xs, run.ys, width)):
      table[x].append(y)
  xs = np.array(sorted(table))
  values = [np.array(table[x]) for x in xs]
  mean = np.array([v.mean() for v in values])
  if band == 'std':
    std = np.array([v.std() for v in values])
    return xs, mean, mean - std, mean + std
  return xs, mean, np.array([v.min() for v in values]), np.array([v.max() for v in values])


def reaches(label, step, width):
  """Whether a run's last bin (at `label`) counts as one at `step`: within a tenth of a bin (runs whose first test
  came a few steps later have their bins a few steps later)."""
  return label >= step - 0.1 * width


def final_return(run, width):
  """The run's value in its last bin."""
  return binning(run.xs, run.ys, width)[1][-1]


def paper_at(paper_runs, step):
  """The paper's mean return over seeds, linearly interpolated at `step` (its last value beyond its end)."""
  points = collections.defaultdict(list)
  for run in paper_runs:
    for x, y in zip(run.xs, run.ys):
      points[x].append(y)
  xs = np.array(sorted(points))
  return float(np.interp(step, xs, [np.mean(points[x]) for x in xs]))


def table(runs, paper_runs, width):
  """Rows of dicts: one per task and method: `final`, the mean of its seeds' last bins (of PAPER_WIDTH steps on a
  task the paper has, binned as its values were; else of `width`), the paper's return at the same step and at its
  end. A method's seeds are those whose last bin reaches its furthest one (`step`): an unfinished run does not
  pull the mean down (runs.md lists every run at its own step)."""
  rows = []
  groups = collections.defaultdict(list)
  for run in runs:
    groups[(run.task, run.method)].append(run)
  for (task, method), group in sorted(groups.items()):
    paper = [r for r in paper_runs if r.task == task]
    bins = PAPER_WIDTH if paper else width  # Beside the paper's values, binned as they were.
    last = [binning(run.xs, run.ys, bins)[0][-1] for run in group]  # The last bins' labels.
    step = max(last)
    group = [run for run, label in zip(group, last) if reaches(label, step, bins)]
    evals = [run.eval['mean'] for run in group if run.eval]
    rows.append(dict(
        task=task, method=method, seeds=len(group), step=int(step), width=bins,
        final=float(np.mean([final_return(run, bins) for run in group])),
        eval=float(np.mean(evals)) if evals else None,
        paper_same_step=paper_at(paper, step) if paper else None,
        paper_final=float(np.mean([r.ys[-1] for r in paper])) if paper else None))
  return rows


def average_rows(rows):
  """One `average` row per method: the mean over its tasks whose row is at the method's furthest step (a task
  further behind is left out: averaging returns at different steps would compare nothing), and the tasks left
  out as (task, method, step)."""
  averages, short = [], []
  for method in sorted({r['method'] for r in rows}):
    own = [r for r in rows if r['method'] == method]
    step = max(r['step'] for r in own)
    at = lambda r: reaches(r['step'], step, r['width'])  # A few steps apart count as the same bin.
    used = [r for r in own if at(r)]
    short += [(r['task'], method, r['step']) for r in own if not at(r)]
    mean = lambda key: (float(np.mean([r[key] for r in used if r[key] is not None]))
                        if any(r[key] is not None for r in used) else None)
    averages.append(dict(task=f'average ({len(used)} task{"s" * (len(used) != 1)})', method=method,
                         seeds=sum(r['seeds'] for r in used), step=step, final=mean('final'), eval=mean('eval'),
                         paper_same_step=mean('paper_same_step'), paper_final=mean('paper_final')))
  return averages, short


COLUMNS = ('task', 'method', 'seeds', 'step', 'final', 'eval', 'paper_same_step', 'paper_final')


def write_csv(path, columns, rows, fmt):
  """rows (dicts) as a CSV file of `columns`, each value written as fmt(value)."""
  with path.open('w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(columns)
    writer.writerows([[fmt(row[c]) for c in columns] for row in rows])


def write_table(outdir, name, columns, rows, digits=1):
  """rows (dicts) as `name`.csv and `name`.md (a markdown table) in outdir, floats to `digits` decimals."""
  fmt = lambda v: '' if v is None else (f'{v:.{digits}f}' if isinstance(v, float) else str(v))
  write_csv(outdir / f'{name}.csv', columns, rows, fmt)
  lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
  lines += ['| ' + ' | '.join(fmt(row[c]) for c in columns) + ' |' for row in rows]
  (outdir / f'{name}.md').write_text('\n'.join(lines) + '\n')


def write_tables(rows, outdir):
  """returns.md / .csv: the rows and each method's average; returns the tasks the averages left out."""
  averages, short = average_rows(rows)
  write_table(outdir, 'returns', COLUMNS, rows + averages)
  return short


RUN_COLUMNS = ('task', 'method', 'seed', 'step', 'tests', 'score', 'eval', 'paper_mean', 'paper_min', 'paper_max',
               'against_paper')


def runs_table(runs, paper_runs):
  """Rows: one per run on a task the paper has: its last bin of PAPER_WIDTH steps binned like the paper's values
  (`step` its label, `tests` its points, `score` their mean; an eval.json is its last point), its eval.json mean
  (the final checkpoint's episodes), and the paper's seeds at that step (each interpolated there): mean, min, max,
  and whether the score is inside their range, above or below it."""
  rows = []
  for run in runs:
    paper = [r for r in paper_runs if r.task == run.task]
    if not paper:
      continue
    labels, means = binning(run.xs, run.ys, PAPER_WIDTH)
    step, score = float(labels[-1]), float(means[-1])
    start = step - PAPER_WIDTH if step > run.xs.min() else -np.inf
    tests = int(np.sum((run.xs > start) & (run.xs <= step)))
    seeds = [float(np.interp(step, r.xs, r.ys)) for r in paper]
    low, high = min(seeds), max(seeds)
    rows.append(dict(task=run.task, method=run.method, seed=run.seed, step=int(step), tests=tests, score=score,
                     eval=float(run.eval['mean']) if run.eval and 'mean' in run.eval else None,
                     paper_mean=float(np.mean(seeds)), paper_min=low, paper_max=high,
                     against_paper='inside' if low <= score <= high else ('above' if score > high else 'below')))
  return rows


TIME_COLUMNS = ('task', 'method', 'seed', 'steps', 'hours', 'paused_hours', 'steps_per_second', 'machines',
                'precision', 'code')


def times_table(runs):
  """Rows: one per run with a run.json (campaign.py's): the environment steps its stretches trained, their wall
  hours net of the pauses run.json counts (`paused_seconds`, from `campaign.py --pause`), those pauses' hours,
  environment steps per second of the unpaused time, and the machines, precisions and code of its stretches."""
  rows = []
  for run in runs:
    if not run.info:
      continue
    stretches = run.info.get('stretches', [])
    seconds = sum(s.get('seconds', 0.0) for s in stretches)
    paused = sum(s.get('paused_seconds', 0.0) for s in stretches)
    steps = sum(max(0, s.get('steps_to', s['steps_from']) - s['steps_from']) for s in stretches)
    net = seconds - paused
    unique = lambda key: ' + '.join(dict.fromkeys(str(s[key]) for s in stretches if s.get(key)))
    rows.append(dict(task=run.task, method=run.method, seed=run.seed, steps=int(steps), hours=net / 3600,
                     paused_hours=paused / 3600, steps_per_second=steps / net if net > 0 else None,
                     machines=unique('device'), precision=unique('precision'), code=unique('code')))
  return rows


def _steps_label(x, _):
  if abs(x) >= 1e6:
    return f'{x / 1e6:g}M'
  return f'{x / 1e3:g}k' if abs(x) >= 1e3 else f'{x:g}'


def plot(runs, paper_runs, baselines, outdir, width, band, xkey, ykey, cols=4):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  import matplotlib.ticker
  tasks = sorted({run.task for run in runs})
  rows_ = int(np.ceil(len(tasks) / cols))
  fig, axes = plt.subplots(rows_, min(cols, len(tasks)), figsize=(max(6, 4 * min(cols, len(tasks))), 3.5 * rows_),
                           squeeze=False)
  methods = sorted({run.method for run in runs})
  colors = dict(zip([PAPER] + methods, plt.rcParams['axes.prop_cycle'].by_key()['color'] * 3))
  for ax, task in zip(axes.flat, tasks):
    xmax = max(run.xs.max() for run in runs if run.task == task)
    groups = [(PAPER, [r for r in paper_runs if r.task == task and r.xs.min() <= xmax])]
    groups += [(m, [r for r in runs if r.task == task and r.method == m]) for m in methods]
    for method, group in groups:
      if not group:
        continue
      xs, mean, low, high = curve(group, width, band)
      if method == PAPER:  # Up to the first point past the runs, so the paper's trend shows.
        keep = np.arange(len(xs)) <= np.searchsorted(xs, xmax)
        xs, mean, low, high = xs[keep], mean[keep], low[keep], high[keep]
      ax.plot(xs, mean, color=colors[method], label=method, marker='o' if len(xs) < 8 else None, ms=3)
      ax.fill_between(xs, low, high, color=colors[method], alpha=0.2)
      if method != PAPER and groups[0][1] and width < PAPER_WIDTH:
        # The same runs binned as the paper's values were: the points to read against the paper's.
        bx, bmean, blow, bhigh = curve(group, PAPER_WIDTH, band)
        ax.errorbar(bx, bmean, yerr=[bmean - blow, bhigh - bmean], color=colors[method], ls='none', marker='D',
                    ms=5, capsize=3, label=f'{method}, binned as the paper')
    for i, (name, score) in enumerate(sorted(baselines.get(task, {}).items())):
      ax.axhline(score, ls='--', lw=1, color=f'C{(i + 5) % 10}', label=name)
    ax.set_title(task)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(_steps_label))
    ax.set_xlabel(xkey)
    ax.set_ylabel(ykey)
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(tasks):]:
    ax.axis('off')
  handles = {}
  for ax in axes.flat:
    for handle, label in zip(*ax.get_legend_handles_labels()):
      handles.setdefault(label, handle)
  ncol = min(len(handles), max(3, 2 * axes.shape[1]))
  fig.legend(handles.values(), handles.keys(), loc='lower center', ncol=ncol, frameon=False)
  fig.tight_layout(rect=(0, 0.06 * int(np.ceil(len(handles) / ncol)) / rows_ + 0.04, 1, 1))
  for suffix in ('png', 'pdf'):
    fig.savefig(outdir / f'curves.{suffix}', dpi=110)
  plt.close(fig)


def horizon_points(runs, width):
  """Rows {task, method, horizon, seeds, final, low, high}: the final return (last bin) over the runs of each task,
  method and imagination horizon (config.json's `horizon`; runs without one are left out)."""
  groups = collections.defaultdict(list)
  for run in runs:
    if run.config and 'horizon' in run.config:
      groups[(run.task, run.method, int(run.config['horizon']))].append(final_return(run, width))
  return [dict(task=task, method=method, horizon=horizon, seeds=len(finals), final=float(np.mean(finals)),
               low=float(np.min(finals)), high=float(np.max(finals)))
          for (task, method, horizon), finals in sorted(groups.items())]


HORIZON_COLUMNS = ('task', 'method', 'horizon', 'seeds', 'final', 'low', 'high')


def plot_horizon(points, outdir, ykey, cols=4):
  """The paper's horizon ablation: per task, each method's final return against its imagination horizon, with the
  min-max over seeds as a band. Also writes the points as horizon.csv and horizon.md."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  tasks = sorted({p['task'] for p in points})
  rows_ = int(np.ceil(len(tasks) / cols))
  fig, axes = plt.subplots(rows_, min(cols, len(tasks)), figsize=(max(6, 4 * min(cols, len(tasks))), 3.5 * rows_),
                           squeeze=False)
  for ax, task in zip(axes.flat, tasks):
    for method in sorted({p['method'] for p in points if p['task'] == task}):
      mine = [p for p in points if p['task'] == task and p['method'] == method]
      xs = [p['horizon'] for p in mine]
      ax.plot(xs, [p['final'] for p in mine], marker='o', ms=3, label=method)
      ax.fill_between(xs, [p['low'] for p in mine], [p['high'] for p in mine], alpha=0.2)
    ax.set_title(task)
    ax.set_xlabel('imagination horizon')
    ax.set_ylabel(f'final {ykey}')
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
  for ax in list(axes.flat)[len(tasks):]:
    ax.axis('off')
  fig.tight_layout()
  for suffix in ('png', 'pdf'):
    fig.savefig(outdir / f'horizon.{suffix}', dpi=110)
  plt.close(fig)
  write_table(outdir, 'horizon', HORIZON_COLUMNS, points)


# The aggregate figure (Agarwal et al., NeurIPS 2021: interval estimates over runs) --------------------------------

STATISTICS = ('IQM', 'median', 'mean')


def normalized(task, value):
  """A DMC return over the maximum return 1000 (other suites' returns are left as they are)."""
  return value / 1000.0 if task.startswith('dmc_') else value


def paper_scores(paper_runs, tasks, step):
  """{task: [score per seed]}: the paper's test return at its recorded step nearest `step`."""
  scores = {}
  for task in tasks:
    for run in (r for r in paper_runs if r.task == task):
      scores.setdefault(task, []).append(float(run.ys[np.argmin(np.abs(run.xs - step))]))
  return scores


def statistic(name, scores):
  from scipy import stats
  scores = np.asarray(scores, np.float64)
  return dict(IQM=lambda: stats.trim_mean(scores, 0.25), median=lambda: np.median(scores),
              mean=lambda: np.mean(scores))[name]()


def interval(per_task, name, resamples=2000, confidence=0.95, seed=0):
  """(point, low, high): the statistic over all normalized scores of {task: [scores]}, with a stratified bootstrap
  confidence interval (each resample draws every task's runs from that task's own, scipy.stats.bootstrap with one
  sample per task)."""
  from scipy import stats
  samples = [np.asarray(v, np.float64) for _, v in sorted(per_task.items())]
  point = statistic(name, np.concatenate(samples))
  # A task with one run draws that run in every resample (scipy resamples only samples of two or more).
  drawn, fixed = [v for v in samples if len(v) > 1], tuple(v for v in samples if len(v) == 1)
  if all(len(np.unique(v)) == 1 for v in drawn):  # Nothing to resample: the interval is the point.
    return point, point, point
  result = stats.bootstrap(drawn, lambda *parts: statistic(name, np.concatenate(parts + fixed)), n_resamples=resamples,
                           confidence_level=confidence, method='percentile', paired=False, vectorized=False,
                           random_state=np.random.default_rng(seed))
  return point, float(result.confidence_interval.low), float(result.confidence_interval.high)


def aggregate_rows(runs, paper_runs, width):
  """Rows {method, runs, tasks, step, IQM, IQM_low, IQM_high, ...}: every method's normalized scores over its runs
  (a run's score: its last bin, of PAPER_WIDTH steps when the paper's seeds are beside them so that both are
  binned alike, else of `width`), and the paper's seeds at their recorded step nearest the runs' on the same
  tasks, with 95% stratified bootstrap intervals. The scores are taken at one step, the furthest any run's last bin
  reaches: runs short of it (unfinished ones, or a method's that stopped earlier) are left out and returned as
  [(run, its last bin's step)]. The statistics pool the runs, so a task with more runs weighs more: the third
  value lists the methods whose tasks have unequal runs, [(method, 'task: n, ...')]."""
  width = PAPER_WIDTH if paper_runs else width
  binned = [(run, *binning(run.xs, run.ys, width)) for run in runs]
  step = max(labels[-1] for _, labels, _ in binned)
  groups = collections.defaultdict(dict)
  short = []
  for run, labels, means in binned:
    if not reaches(labels[-1], step, width):
      short.append((run, int(labels[-1])))
      continue
    groups[run.method].setdefault(run.task, []).append(normalized(run.task, float(means[-1])))
  uneven = [(method, ', '.join(f'{task}: {len(v)}' for task, v in sorted(per_task.items())))
            for method, per_task in sorted(groups.items()) if len({len(v) for v in per_task.values()}) > 1]
  tasks = sorted({task for per_task in groups.values() for task in per_task})
  paper = {t: [normalized(t, v) for v in vs] for t, vs in paper_scores(paper_runs, tasks, step).items()}
  if paper:
    groups[PAPER] = paper
  rows = []
  for method, per_task in sorted(groups.items()):
    row = dict(method=method, runs=sum(map(len, per_task.values())), tasks=len(per_task), step=int(step))
    for name in STATISTICS:
      row[name], row[f'{name}_low'], row[f'{name}_high'] = interval(per_task, name)
    rows.append(row)
  return rows, short, uneven


AGGREGATE_COLUMNS = ('method', 'runs', 'tasks', 'step') + tuple(
    f'{name}{part}' for name in STATISTICS for part in ('', '_low', '_high'))


def plot_aggregate(rows, outdir):
  """Interval estimates per method: the IQM, median and mean of the normalized scores with their 95% stratified
  bootstrap intervals; also aggregate.md and aggregate.csv."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(STATISTICS), figsize=(3.2 * len(STATISTICS), 0.5 * len(rows) + 1.4), sharey=True)
  colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
  for ax, name in zip(axes, STATISTICS):
    for y, row in enumerate(rows):
      ax.barh(y, row[f'{name}_high'] - row[f'{name}_low'], left=row[f'{name}_low'], height=0.6,
              color=colors[y % len(colors)], alpha=0.6)
      ax.vlines(row[name], y - 0.3, y + 0.3, color='black', lw=2)
    ax.set_yticks(range(len(rows)), [f'{r["method"]} ({r["runs"]} runs)' for r in rows])
    ax.set_title(name)
    ax.grid(axis='x', alpha=0.3)
  fig.supxlabel('normalized score (DMC: return / 1000)', fontsize=9)
  fig.suptitle(f'{rows[0]["tasks"]} tasks at {_steps_label(rows[0]["step"], None)} steps; 95% stratified '
               'bootstrap intervals', fontsize=9)
  fig.tight_layout()
  for suffix in ('png', 'pdf'):
    fig.savefig(outdir / f'aggregate.{suffix}', dpi=110)
  plt.close(fig)
  fmt = lambda v: f'{v:.3f}' if isinstance(v, float) else str(v)
  write_csv(outdir / 'aggregate.csv', AGGREGATE_COLUMNS, rows, fmt)
  lines = ['| method | runs | tasks | step | ' + ' | '.join(f'{n} [95% CI]' for n in STATISTICS) + ' |',
           '|' + '---|' * (4 + len(STATISTICS))]
  lines += ['| ' + ' | '.join(str(r[c]) for c in ('method', 'runs', 'tasks', 'step')) + ' | ' + ' | '.join(
      f'{r[n]:.3f} [{r[n + "_low"]:.3f}, {r[n + "_high"]:.3f}]' for n in STATISTICS) + ' |' for r in rows]
  (outdir / 'aggregate.md').write_text('\n'.join(lines) + '\n')


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--indir', type=pathlib.Path, required=True)
  parser.add_argument('--outdir', type=pathlib.Path, required=True)
  parser.add_argument('--tasks', nargs='*', default=['*'], help='glob patterns, e.g. dmc_walker_*')
  parser.add_argument('--methods', nargs='*', default=['*'], help='glob patterns')
  parser.add_argument('--figure', choices=('curves', 'horizon', 'aggregate'), default='curves',
                      help='curves: return against steps per task; horizon: final return against the horizon; '
                      'aggregate: IQM, median and mean over all runs with stratified bootstrap intervals')
  parser.add_argument('--xkey', default='step')
  parser.add_argument('--ykey', default='test/return')
  parser.add_argument('--bins', type=float, default=1e5, help='bin width in steps')
  parser.add_argument('--band', choices=('minmax', 'std'), default='minmax')
  parser.add_argument('--scores', type=pathlib.Path, default=SCORES, help='folder of dreamer.json, baselines.json')
  parser.add_argument('--no_paper', action='store_true', help='do not draw the published curves')
  parser.add_argument('--hline', action='append', default=[], metavar='TASK:LABEL=VALUE',
                      help="an extra horizontal line, e.g. 'dmc_cheetah_run:random policy=5.2'")
  args = parser.parse_args(argv)
  if args.bins <= 0:
    parser.error(f'--bins must be positive, got {args.bins}')
  match = lambda name, patterns: any(fnmatch.fnmatch(name, p) for p in patterns)
  runs = [r for r in load_runs(args.indir, args.xkey, args.ykey)
          if match(r.task, args.tasks) and match(r.method, args.methods)]
  if not runs:
    print(f'Error: no runs with {args.xkey} and {args.ykey} under {args.indir} '
          '(expected <indir>/<task>/<method>/<seed>/metrics.jsonl).', file=sys.stderr)
    return 2
  args.outdir.mkdir(parents=True, exist_ok=True)
  if args.figure == 'horizon':
    points = horizon_points(runs, args.bins)
    if not points:
      print(f'Error: no run under {args.indir} has a config.json with a horizon.', file=sys.stderr)
      return 2
    plot_horizon(points, args.outdir, args.ykey)
    print((args.outdir / 'horizon.md').read_text())
    print(f'Wrote {args.outdir / "horizon.png"}, horizon.pdf, horizon.md and horizon.csv.')
    return 0
  paper_runs, baselines = load_paper(args.scores)
  if args.no_paper:
    paper_runs, baselines = [], {}
  for line in args.hline:
    try:
      task, rest = line.split(':', 1)
      label, value = rest.rsplit('=', 1)
      baselines.setdefault(task, {})[label] = float(value)
    except ValueError:
      parser.error(f"--hline {line}: expected TASK:LABEL=VALUE, e.g. 'dmc_cheetah_run:random policy=5.2'")
  args.outdir.mkdir(parents=True, exist_ok=True)
  if args.figure == 'aggregate':
    rows, short, uneven = aggregate_rows(runs, paper_runs, args.bins)
    plot_aggregate(rows, args.outdir)
    print((args.outdir / 'aggregate.md').read_text())
    for run, step in short:
      print(f'Left out (short of step {rows[0]["step"]}): {run.task}/{run.method}/{run.seed}, its last bin at {step}.')
    for method, counts in uneven:
      print(f'Note: {method} has {counts} runs: its pooled statistics weigh the tasks unequally.')
    print(f'Wrote {args.outdir / "aggregate.png"}, aggregate.pdf, aggregate.md and aggregate.csv.')
    return 0
  plot(runs, paper_runs, baselines, args.outdir, args.bins, args.band, args.xkey, args.ykey)
  short = write_tables(table(runs, paper_runs, args.bins), args.outdir)
  print((args.outdir / 'returns.md').read_text())
  for task, method, step in short:
    print(f'Not in the average of {method}: {task}, at step {step} (behind its other tasks).')
  written = 'returns.md and returns.csv'
  per_run = runs_table(runs, paper_runs)
  if per_run:
    write_table(args.outdir, 'runs', RUN_COLUMNS, per_run)
    print((args.outdir / 'runs.md').read_text())
    written = written.replace(' and ', ', ') + ', runs.md and runs.csv'
  times = times_table(runs)
  if times:
    write_table(args.outdir, 'times', TIME_COLUMNS, times, digits=2)
    print((args.outdir / 'times.md').read_text())
    written = written.replace(' and ', ', ') + ', times.md and times.csv'
  print(f'Wrote {args.outdir / "curves.png"}, curves.pdf, {written}.')
  return 0


if __name__ == '__main__':
  sys.exit(main())
