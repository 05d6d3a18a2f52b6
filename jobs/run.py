"""Ray job entrypoint: the whole run (every stage in order, finished ones skipped).

    python jobs/run.py [CONFIG] [--run-dir DIR] [--from STAGE | --only STAGE] [--debug]

Submitted by ``kalm submit CONFIG --address URL`` (config in $KALM_CONFIG_YAML), by the
KubeRay RayJob in cluster/kuberay/rayjob.yaml, or by hand:
``ray job submit --runtime-env jobs/runtime_env.yaml -- python jobs/run.py configs/clevr.yaml``.
"""

import sys

from kalm_ray.cluster.submit import job_main

if __name__ == "__main__":
    sys.exit(job_main(None))
