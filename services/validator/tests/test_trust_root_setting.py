"""Outside SLMOPS_ENV=local the validator must be given a pinned trust root: it fails at start,
not per judged variant."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from slmops.settings import PlatformSettings
from slmops_validator.settings import ValidatorSettings


def test_prod_without_a_trust_root_is_refused_at_start(tmp_path: Path) -> None:
    prod = PlatformSettings(env="prod", s3_secret_access_key="a-real-secret-value")
    with pytest.raises(ValidationError, match="SLMOPS_VALIDATOR_TRUST_ROOT_FILE is unset"):
        ValidatorSettings(platform=prod)
    root = tmp_path / "root.json"
    assert ValidatorSettings(platform=prod, trust_root_file=root).trust_root_file == root
    assert ValidatorSettings(platform=PlatformSettings(env="local")).trust_root_file is None
