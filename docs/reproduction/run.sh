#!/bin/sh
# The reproduction campaign (docs/reproduction.md): the `cpu` preset on three DMC tasks, two seeds each, then the
# paper's configuration on walker walk and pendulum swingup, each to 1e5 environment steps. Resumable: the same
# command continues where it stopped. The runs (replays, checkpoints) go to $OUTDIR, outside the repository;
# their small files are copied to docs/reproduction/runs/ to be committed.
#   sh docs/reproduction/run.sh            (OUTDIR defaults to ../campaigns/reproduction)
set -e
cd "$(dirname "$0")/../.."
OUTDIR=${OUTDIR:-../campaigns/reproduction}
python campaign.py --outdir "$OUTDIR" --copy docs/reproduction/runs --steps 1e5 --eval_episodes 10 \
  --tasks dmc_walker_walk dmc_cheetah_run dmc_pendulum_swingup --methods dreamer_cpu --seeds 0 1
python campaign.py --outdir "$OUTDIR" --copy docs/reproduction/runs --steps 1e5 --eval_episodes 10 \
  --tasks dmc_walker_walk --methods dreamer --seeds 0
# Pendulum at the paper's configuration: the `cpu` preset's seed 0 ended far below the paper's five seeds and seed 1
# had not scored by half way (docs/reproduction.md); one seed of the paper's own configuration says whether the
# preset or the port is the reason.
python campaign.py --outdir "$OUTDIR" --copy docs/reproduction/runs --steps 1e5 --eval_episodes 10 \
  --tasks dmc_pendulum_swingup --methods dreamer --seeds 0
