"""The pipeline, one file per stage, in the order ``kalm run`` runs them.

==========  =============================  ==============================================
stage       reads                          writes
==========  =============================  ==============================================
collect     the env suite                  ``data/real/``, ``data/instructions.parquet``
ground      ``data/real/``                 ``model/``
imagine     ``model/``, ``data/real/``     ``data/imagined/``
train       ``data/real/`` (+ imagined)    ``policy/``
evaluate    ``policy/``, instructions      ``eval/``
==========  =============================  ==============================================

Each module defines one ``run_<stage>(cfg, run_dir) -> Manifest`` that reads top to
bottom (plan -> build -> run -> save); the machinery it calls lives beneath, in
``kalm_ray.data`` (collect), ``kalm_ray.llm`` (ground, imagine), ``kalm_ray.rl`` (train)
and ``kalm_ray.eval`` (evaluate). :mod:`kalm_ray.pipeline` maps stage names to them.
Nothing is imported here.
"""
