"""Evaluation: validation sets, multiple-choice tasks and keep-ratio sweeps, in the training loop
(:class:`mone_train.components.evaluator.Evaluator`) and offline (``mone-eval``)."""
