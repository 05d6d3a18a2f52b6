"""Running kalm_ray on a Ray cluster: :mod:`kalm_ray.cluster.submit` is the Ray Jobs client."""
