#!/bin/sh
# The paper's ablations on one task, every variant at one size and one step budget (see docs/ablations.md), run by
# campaign.py (resumable, lowest CPU priority; a finished run is skipped). Not run by the tests: each run takes from
# tens of minutes to hours on a 2-core CPU. Usage:
#   sh docs/run_ablations.sh [task] [steps] [seed]      (defaults: dmc_walker_walk 100000 0)
# Environment (all optional):
#   FLAGS="..."          flags added to every run (default: --preset cpu)
#   EVAL_EPISODES=N      episodes of the final evaluation of each run (default 10)
#   PLANET_SECONDS=S     stop the planet run after S seconds of training (SIGTERM, which saves its checkpoint), so
#                        that it gets the CPU time of the slowest Dreamer run instead of its environment steps;
#                        'auto' takes the longest wall time among the other variants' runs (default: no limit)
#   HORIZONS="5 10 ..."  the horizon sweep's horizons (default "5 10 20 30"; "" skips the sweep)
# Writes runs/ablations/<task>/<method>/<seed>/ and runs/horizons/<task>/<method>/horizon<H>_s<seed>/, then the
# figures.
set -e
cd "$(dirname "$0")/.."
TASK=${1:-dmc_walker_walk}
STEPS=${2:-100000}
SEED=${3:-0}
FLAGS=${FLAGS:---preset cpu}
EVAL_EPISODES=${EVAL_EPISODES:-10}
HORIZONS=${HORIZONS-5 10 20 30}
COMMON="--tasks $TASK --seeds $SEED --steps $STEPS --eval_episodes $EVAL_EPISODES"

LIMIT=
if [ -n "$PLANET_SECONDS" ]; then LIMIT="--limit planet=$PLANET_SECONDS"; fi
python campaign.py --outdir runs/ablations $COMMON --flags "$FLAGS" $LIMIT \
  --methods dreamer no_value dreamer_nstep contrastive reward_only planet

# Final return against the imagination horizon (the paper's horizon figure: Dreamer, n-step and no value).
if [ -n "$HORIZONS" ]; then
  python campaign.py --outdir runs/horizons $COMMON --flags "$FLAGS" --methods dreamer dreamer_nstep no_value \
    --sweep horizon $HORIZONS
  for method in dreamer dreamer_nstep no_value; do  # Horizon 15 (the default) is the ablation run above.
    ln -sfn "$PWD/runs/ablations/$TASK/$method/$SEED" "runs/horizons/$TASK/$method/horizon15_s$SEED"
  done
fi

python plotting.py --indir runs/ablations --outdir docs/ablations --tasks "$TASK" --no_paper --bins 2500
if [ -n "$HORIZONS" ]; then
  python plotting.py --indir runs/horizons --outdir docs/ablations --tasks "$TASK" --figure horizon --bins 2500
fi
