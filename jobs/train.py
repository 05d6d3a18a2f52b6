"""Ray job entrypoint, stage ``train``: offline RL policies (RLlib).

    python jobs/train.py [CONFIG] [--run-dir DIR] [--debug]

Submitted by ``kalm submit CONFIG --stage train --address URL`` (config in $KALM_CONFIG_YAML),
or by hand from the repository root:
``ray job submit --runtime-env jobs/runtime_env.yaml -- python jobs/train.py CONFIG``.
"""

import sys

from kalm_ray.cluster.submit import job_main

if __name__ == "__main__":
    sys.exit(job_main("train"))
