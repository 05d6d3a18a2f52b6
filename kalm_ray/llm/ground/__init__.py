"""The ``ground`` stage's machinery (:mod:`kalm_ray.stages.ground` runs it): preparing the
base model and codec and building the examples (:mod:`.fit`), the Ray Train worker loop
(:mod:`.train_fn`; its progress bar is :mod:`kalm_ray.progress`) and the held-out
grounding metrics (:mod:`.metrics`). Shared with imagination, one level up: the codec, its grammar,
the prompts, model loading and the LLM as a policy.

Nothing is imported here, so importing the package costs nothing.
"""
