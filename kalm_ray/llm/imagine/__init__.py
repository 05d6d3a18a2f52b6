"""The ``imagine`` stage's machinery (:mod:`kalm_ray.stages.imagine` runs it): generation
requests (:mod:`.requests`), the backends that write rollouts (:mod:`.backends`: hf with the
stepwise imaginer, vLLM through Ray Data), the validity filter (:mod:`.filter`), labels
(:mod:`.labels`), the replay diagnostic (:mod:`.replay`) and the judged-batch store and
writer (:mod:`.store`). Shared with grounding, one level up: the codec, its grammar, the
prompts, model loading and the LLM as a policy.

Nothing is imported here, so importing the package costs nothing.
"""
