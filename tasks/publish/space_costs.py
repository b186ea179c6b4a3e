"""Cost and runtime controls of the demo Space: persistent storage, starting from an existing Space, and the
idle check a Prefect schedule runs (pause or downgrade after N idle hours).

Persistent storage is a Storage Bucket mounted at /data as a Space volume. The Hub discontinued the old
persistent storage tiers (small/medium/large) in favour of buckets, and huggingface_hub 2.4 has no call
for tiers any more (`set_space_volumes` replaced `request_space_storage`). With the model cache there
(HF_HOME=/data/.huggingface) a restarted or woken Space does not download the model again.

Idle time comes from the Space's run log: the apps print a `loraship: activity <UTC time>` line per
request, and Spaces prints `===== Application Startup at <time> =====` when the container starts; the last
of those is the last activity. The Hub has no "last request" field, and reading the log never wakes the
Space (calling its API would).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from tasks.core.errors import PermanentError

log = logging.getLogger("loraship.space")

DATA_MOUNT = "/data"
HF_HOME_ON_STORAGE = "/data/.huggingface"
_ACTIVITY = re.compile(r"loraship: activity (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)")
_STARTUP = re.compile(r"===== Application Startup at (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) =====")


def bucket_id(settings: Any, space_id: str) -> str:
    """The Storage Bucket the Space's /data is: space.storage_bucket, else <Space owner>/<Space name>-storage."""
    return settings.storage_bucket or f"{space_id}-storage"


def hf_home(settings: Any) -> str:
    """HF_HOME for the Space: on the bucket when there is one; empty (the platform's default) otherwise."""
    return HF_HOME_ON_STORAGE if settings.storage == "bucket" else ""


def storage_volume(settings: Any, space_id: str) -> Any | None:
    """The volume to mount at /data, or None without persistent storage."""
    if settings.storage != "bucket":
        return None
    from huggingface_hub import Volume

    return Volume(type="bucket", source=bucket_id(settings, space_id), mount_path=DATA_MOUNT)


def ensure_storage(api: Any, space_id: str, settings: Any, call: Any) -> dict[str, Any]:
    """Create the private bucket (exist_ok) and mount it at /data unless the Space's runtime already has it.

    Compared with the Space every run (remote state is never taken from a record); volumes mounted elsewhere
    are kept. With storage none nothing is removed: a bucket holds the user's data."""
    volume = storage_volume(settings, space_id)
    if volume is None:
        return {"storage": "none"}
    bid = bucket_id(settings, space_id)
    call(f"create the bucket {bid} for", api.create_bucket, bid, private=True, exist_ok=True)
    runtime = call("read the runtime of", api.get_space_runtime, space_id)
    current = [v.to_dict() for v in (getattr(runtime, "volumes", None) or [])]
    changed = volume.to_dict() not in current
    if changed:
        from huggingface_hub import Volume

        keep = [Volume(**v) for v in current if v.get("mountPath") != DATA_MOUNT]
        call("mount the bucket on", api.set_space_volumes, space_id, [*keep, volume])
        log.info("Space %s: bucket %s mounted at %s (HF_HOME=%s)", space_id, bid, DATA_MOUNT, HF_HOME_ON_STORAGE)
    return {"storage": "bucket", "bucket": bid, "mount_path": DATA_MOUNT, "storage_changed": changed}


def duplicate_if_new(
    api: Any, space_id: str, settings: Any, variables: dict[str, str], call: Any, sleep_time: int | None
) -> bool:
    """With space.duplicate_from: copy that Space to `space_id` when it does not exist yet (its app, with
    our hardware, sleep time, variables and storage); True when it was copied now. Later runs only configure
    it: loraship never uploads over a Space the user chose to start from."""
    if not settings.duplicate_from:
        return False
    if call("look up", api.repo_exists, space_id, repo_type="space"):
        return False
    if not call("look up", api.repo_exists, settings.duplicate_from, repo_type="space"):
        raise PermanentError(
            f"space.duplicate_from {settings.duplicate_from!r}: no such Space (or the token cannot read it)",
            hint="name an existing Space as owner/name",
        )
    volume = storage_volume(settings, space_id)
    if volume is not None:
        bid = bucket_id(settings, space_id)
        call(f"create the bucket {bid} for", api.create_bucket, bid, private=True, exist_ok=True)
    call(
        f"duplicate {settings.duplicate_from} as",
        api.duplicate_repo,
        settings.duplicate_from,
        space_id,
        repo_type="space",
        private=settings.private,
        space_hardware=settings.hardware,
        space_sleep_time=sleep_time,
        space_variables=[{"key": k, "value": v} for k, v in variables.items()],
        space_volumes=[volume] if volume is not None else None,
    )
    log.info("Space %s: duplicated from %s", space_id, settings.duplicate_from)
    return True


# --- idle ---------------------------------------------------------------------------------------------


def last_activity(lines: list[str]) -> datetime | None:
    """The last request (or container start) in the run log lines; None when the log says neither."""
    seen: list[datetime] = []
    for line in lines:
        for m in _ACTIVITY.finditer(line):
            seen.append(datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC))
        for m in _STARTUP.finditer(line):
            seen.append(datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC))
    return max(seen) if seen else None


@dataclass(frozen=True)
class IdleDecision:
    action: Literal["pause", "downgrade", "none"]
    reason: str
    idle_hours: float | None = None


def idle_decision(stage: str, hardware: str | None, lines: list[str], settings: Any, now: datetime) -> IdleDecision:
    """What the schedule does to a Space: nothing unless it is RUNNING on costly hardware (for downgrade:
    other than the target) and idle for at least space.idle_hours."""
    if settings.idle_hours is None:
        return IdleDecision("none", "space.idle_hours is not set")
    if stage != "RUNNING":
        return IdleDecision("none", f"the Space is {stage}, not RUNNING")
    if settings.idle_action == "downgrade" and hardware == settings.idle_downgrade_to:
        return IdleDecision("none", f"already on {hardware}")
    if settings.idle_action == "pause" and hardware == "cpu-basic":
        return IdleDecision("none", "cpu-basic is free and sleeps on its own after 48 h")
    last = last_activity(lines)
    if last is None:
        return IdleDecision("none", "the run log shows no activity or start time; not judging idleness")
    idle = (now - last).total_seconds() / 3600
    if idle < settings.idle_hours:
        return IdleDecision("none", f"idle {idle:.1f} h < {settings.idle_hours:g} h", idle)
    return IdleDecision(settings.idle_action, f"idle {idle:.1f} h >= {settings.idle_hours:g} h", idle)


def check_idle(
    api: Any, space_id: str, settings: Any, *, now: datetime | None = None, apply: bool = True
) -> dict[str, Any]:
    """Read the Space's runtime and run log, decide, and (with `apply`) pause or downgrade it. Returns the
    decision as a record (space_id, stage, hardware, action, reason, idle_hours, applied)."""
    runtime = api.get_space_runtime(space_id)
    hardware = str(runtime.hardware or runtime.requested_hardware or "") or None
    try:
        lines = [str(line) for line in api.fetch_space_logs(space_id, build=False)]
    except Exception as exc:  # no log: no judgement
        log.warning("Space %s: no run log (%s)", space_id, exc)
        lines = []
    decision = idle_decision(str(runtime.stage), hardware, lines, settings, now or datetime.now(UTC))
    applied = False
    if apply and decision.action == "pause":
        api.pause_space(space_id)
        applied = True
    elif apply and decision.action == "downgrade":
        api.request_space_hardware(space_id, settings.idle_downgrade_to)
        applied = True
    log.info("Space %s: idle check: %s (%s)%s", space_id, decision.action, decision.reason, "" if apply else " [dry]")
    return {
        "space_id": space_id,
        "stage": str(runtime.stage),
        "hardware": hardware,
        "action": decision.action,
        "reason": decision.reason,
        "idle_hours": decision.idle_hours,
        "applied": applied,
    }
