"""Offline RL on RLlib's new API stack: data pipeline, algorithms, the ``train`` stage, and the
policy loader that evaluation uses (:func:`kalm_ray.rl.policy.load_policy`)."""
