"""Running kalm_ray on a Ray cluster: :mod:`kalm_ray.cluster.submit` is the Ray Jobs client;
:mod:`kalm_ray.cluster.actor_pool` is the one fault-tolerant actor pool the stages fan work
out on (collection and evaluation actors)."""
