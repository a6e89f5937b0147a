"""Where the validator's jobs work: one folder per job under ``<scratch_dir>/jobs``, named after
the process that owns it (:mod:`slmops.jobdirs`), so the folders of a validator killed mid-job
are removed when the next one starts."""

from __future__ import annotations

from pathlib import Path

from slmops_validator.settings import ValidatorSettings


def job_root(settings: ValidatorSettings) -> Path:
    """The folder that holds the validator's job folders."""
    return settings.scratch_dir / "jobs"
