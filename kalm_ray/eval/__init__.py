"""Evaluation: trained policies on every task level, in parallel Ray actors; results and report.

``evaluate.run_evaluate`` is the stage; ``episodes`` fixes what is evaluated and steps
batches of envs; ``eval_actor`` holds the Ray role and its pool; ``stats`` and ``results``
are the math; ``report`` writes ``report.md`` and plots from files alone.
"""
