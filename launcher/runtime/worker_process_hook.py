"""What every process of an embedded Ray cluster runs first (Ray's worker_process_setup_hook).

Ray Train's PlacementGroupCleaner (a detached actor of every `calm train` run) asks Ray's State API each
second whether the run's controller still lives, to free its placement group if it died. The State API
is served by the dashboard, which an embedded cluster does not run (launcher.runtime.ray_start), so
every ask fails with a warning: 981 of the 1,018 lines a 17-minute real-anchor run printed. There the
cleaner can never act, so its failures say nothing: they are dropped. Connected clusters are left as
they are (with a dashboard, the warning means something).
"""

from __future__ import annotations

import logging

CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
HOOK = f"{__name__}.drop_state_api_warnings"


class _StateApiWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "State API may be temporarily unavailable" not in record.getMessage()


def drop_state_api_warnings() -> None:
    logging.getLogger(CLEANER_LOGGER).addFilter(_StateApiWarnings())
