"""Environment defaults that must be set before prefect or huggingface_hub are imported."""

from __future__ import annotations

import os


def prepare_environment() -> None:
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "loraship")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # A local run with no Prefect server configured uses Prefect's ephemeral API (started on demand).
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from tasks.core.scrub import install_log_scrubbing

    install_log_scrubbing()  # every log record, also those Prefect sends to its UI, without credentials
