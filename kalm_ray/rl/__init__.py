"""Offline RL on RLlib's new API stack: data pipeline, algorithms, the ``train`` stage's machinery
(:mod:`kalm_ray.stages.train` is the stage), and the policy loader that evaluation uses
(:func:`kalm_ray.rl.policy.load_policy`)."""
