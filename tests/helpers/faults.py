"""Faults injected into real runs: non-finite gradients at chosen optimizer steps.

``poisoned_builder(build, steps)`` wraps the trainer's model builder so that one weight's
gradient is NaN in the backward passes of the given optimizer steps (1-based; one micro batch
per step, so the n-th backward is step n). As a script, it runs ``mone-train`` with that patch:

    python -m tests.helpers.faults 4,5,6 model=tiny trainer=smoke ...
"""

from __future__ import annotations

import sys


def poisoned_builder(build, steps: set[int]):
    """``build`` (the trainer's ``build_model``) with NaN in one gradient at ``steps``."""

    def build_poisoned(*args, **kwargs):
        model, params = build(*args, **kwargs)
        backwards = {"count": 0}

        def hook(grad):
            backwards["count"] += 1
            return grad * float("nan") if backwards["count"] in steps else grad

        params[0].register_hook(hook)
        return model, params

    return build_poisoned


if __name__ == "__main__":
    from mone_train import trainer
    from mone_train.train import main

    steps = {int(s) for s in sys.argv[1].split(",")}
    trainer.build_model = poisoned_builder(trainer.build_model, steps)
    sys.argv = ["mone-train", *sys.argv[2:]]
    main()
