"""Does MeanFlow's 2D run get worse with length under the paper recipe too? (issue 19: the fast
recipe's ~11k steps in 120 s left MeanFlow worse than the paper recipe's ~3k, and no single change
of the recipe was responsible.) One paper-recipe MeanFlow run, scored at several step counts; the
sqrt schedule does not depend on the run's length, so one run gives every point.

    python benchmarks/meanflow_length.py --steps 1000 3000 6000 9000
"""

from __future__ import annotations

import argparse
import json
import time

from pyflowmap.toy2d.config import TrainConfig
from pyflowmap.toy2d.evaluate import evaluate
from pyflowmap.toy2d.train import Trainer


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, nargs="+", default=[1000, 3000, 6000, 9000])
    p.add_argument("--recipe", default="paper")
    args = p.parse_args(argv)
    trainer = Trainer(TrainConfig.from_recipe(args.recipe, objective="meanflow", steps=max(args.steps),
                                              ckpt_every=10**9), progress=False)
    t0 = time.perf_counter()
    for n in sorted(args.steps):
        trainer.fit(steps=n)
        rep = evaluate(trainer.ema, trainer.base, "checker", steps=(1, 2, 4, 8), samplers=("map", "heun"), n=65536)
        row = {"recipe": args.recipe, "steps": n, "train_s": round(time.perf_counter() - t0),
               **{f"map{k}": round(rep["results"]["map"][k]["kl"], 3) for k in (1, 2, 4, 8)},
               "heun8": round(rep["results"]["heun"][8]["kl"], 3)}
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
