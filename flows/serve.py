"""`visionops serve`: the scheduled deployment of ``training-pipeline``, from params.yaml.

It registers the deployment ``training-pipeline/<schedule.deployment>`` with the cron of
``schedule.cron`` in ``schedule.timezone``, bound to this workspace, then runs its scheduled and
manually triggered runs (each in its own process) until stopped. Runs in the same workspace
still train one at a time: the pipeline takes the workspace lock.
"""

from __future__ import annotations

from prefect.client.schemas.schedules import CronSchedule
from prefect.schedules import Cron
from pydantic import ValidationError

from flows.pipeline import training_pipeline
from tasks.params import ConfigError, Params
from tasks.paths import Workspace

TAGS = ["visionops"]


def check_schedule(cron: str, timezone: str) -> None:
    """:class:`ConfigError` naming ``schedule.cron``/``schedule.timezone`` when Prefect would refuse them."""
    try:
        CronSchedule(cron=cron, timezone=timezone)
    except ValidationError as exc:
        error = exc.errors()[0]
        field, value = ("timezone", timezone) if "timezone" in error["loc"] else ("cron", cron)
        raise ConfigError(f"schedule.{field}: {value!r} is not a valid Prefect cron schedule: {error['msg']}") from exc


def serve(ws: Workspace, params: Params) -> None:
    """Register the deployment and run its flow runs until interrupted (Ctrl-C or SIGTERM)."""
    schedule = params.schedule
    check_schedule(schedule.cron, schedule.timezone)
    training_pipeline.serve(
        name=schedule.deployment,
        schedules=[Cron(schedule.cron, timezone=schedule.timezone)],
        parameters={"workspace": str(ws.root)},
        tags=TAGS,
        description=f"visionops training pipeline on {ws.root}, {schedule.cron} ({schedule.timezone})",
    )
