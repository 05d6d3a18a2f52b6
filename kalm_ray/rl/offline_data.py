"""An RLlib ``OfflineData`` that serves kalm_ray's prepared columns as already-mapped batches.

RLlib's default offline path turns every row into a one-step ``SingleAgentEpisode`` in an
``OfflinePreLearner`` actor and runs the learner connector over those episodes. For BC,
discrete CQL, CQL and IQL that connector only copies ``obs, actions, rewards, new_obs,
terminateds, truncateds`` into the batch (checked against RLlib 2.60's PreLearner output in
``tests/test_rl_data.py``), which the prepared data already holds. So this class reads the
prepared Parquet, names the columns the way the PreLearner would (``default_policy/obs``, ...)
and marks the data as mapped: no episode objects, no PreLearner actor per training unit.
MARWIL keeps RLlib's default path (its connector computes advantages with the module).
"""

from __future__ import annotations

import pyarrow.fs as pafs
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.offline.offline_data import OfflineData
from ray.rllib.utils.annotations import override

MAPPED_COLUMNS: tuple[str, ...] = (
    Columns.OBS,
    Columns.ACTIONS,
    Columns.REWARDS,
    Columns.NEXT_OBS,
    Columns.TERMINATEDS,
    Columns.TRUNCATEDS,
)


class PreparedOfflineData(OfflineData):
    """``OfflineData`` over prepared columns; materialised once (after renaming) when
    ``config.materialize_mapped_data`` is set, as RLlib does after its own mapping. Set
    ``materialize_data=False`` (the parent would materialise the raw columns first)."""

    @override(OfflineData)
    def __init__(self, config):
        super().__init__(config)
        names = {c: f"{DEFAULT_MODULE_ID}/{c}" for c in MAPPED_COLUMNS}
        if config.materialize_mapped_data:
            # Read in this process and hand Ray Data the table: one read per unit and no read
            # tasks to schedule (each needs a worker process; slow on a busy 2-core machine).
            import pyarrow.dataset as pads
            import ray.data

            fs = self.filesystem_object or pafs.LocalFileSystem()
            table = pads.dataset(str(self.path), filesystem=fs, format="parquet").to_table(
                columns=list(MAPPED_COLUMNS)
            )
            table = table.rename_columns([names[c] for c in table.column_names])
            # NOTE: each epoch of a Ray Data iterator starts a new execution (~0.1-1 s here);
            # repeat a small table so that one epoch spans at least one training iteration.
            rows_per_iter = config.train_batch_size_per_learner * (
                config.dataset_num_iters_per_learner or 1
            )
            copies = max(1, -(-rows_per_iter // max(1, table.num_rows)))
            self.data = ray.data.from_arrow([table] * copies)
        else:
            self.data = self.data.select_columns(list(MAPPED_COLUMNS)).rename_columns(names)
        self.data_is_mapped = True
