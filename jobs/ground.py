"""Ray job entrypoint, stage ``ground``: fine-tune the LLM (Ray Train).

    python jobs/ground.py [CONFIG] [--run-dir DIR] [--debug]

Submitted by ``kalm submit CONFIG --stage ground --address URL`` (config in $KALM_CONFIG_YAML),
or by hand from the repository root:
``ray job submit --runtime-env jobs/runtime_env.yaml -- python jobs/ground.py CONFIG``.
"""

import sys

from kalm_ray.cluster.submit import job_main

if __name__ == "__main__":
    sys.exit(job_main("ground"))
