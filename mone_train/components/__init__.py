"""The trainer's components: each one job of the training loop, called from ``trainer.py``.

checkpoint (format) and checkpointer (resume, periodic and preemption saves), evaluator,
health metrics, metrics records, optimizer, run directory, straggler report, tracking,
train step, hang watchdog.
"""
