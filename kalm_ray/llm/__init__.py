"""The grounded LLM: codec (numbers <-> tokens), grounding prompts, models, and the machinery
of the ``ground`` and ``imagine`` stages (:mod:`kalm_ray.stages.ground`,
:mod:`kalm_ray.stages.imagine`).

Public API the other stages rely on:

- :class:`kalm_ray.llm.codec.Codec` (``for_suite``, ``save``/``load``, ``encode_state``,
  ``encode_trajectory``, ``decode_rollout``, ``end_token``) and
  :class:`kalm_ray.llm.codec.CodecError` with ``reason`` in ``DECODE_REASONS``;
- :func:`kalm_ray.llm.prompts.rollout_prompt`;
- :func:`kalm_ray.llm.model.load_grounded` and :func:`kalm_ray.llm.model.model_files`.

Nothing is imported here, so importing the package costs nothing.
"""
