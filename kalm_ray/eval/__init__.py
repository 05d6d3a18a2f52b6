"""Evaluation: trained policies on every task level, in parallel Ray actors; results and report.

The stage is :mod:`kalm_ray.stages.evaluate`; ``evaluate`` holds its machinery (policies,
work units, the resume store); ``episodes`` fixes what is evaluated and steps
batches of envs; ``eval_actor`` holds the Ray role and its pool; ``stats`` and ``results``
are the math; ``report`` writes ``report.md`` and plots from files alone.
"""
