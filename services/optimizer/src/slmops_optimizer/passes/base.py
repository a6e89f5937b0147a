"""The optimization pass contract: a small class with a declarative config, registered by name.

A pass turns one ONNX model (a file, with any external data beside it) into another inside the
job's work directory. Heavy imports (onnx, onnxruntime, torch) live inside ``run`` so that the
service, its API and its tests of planning never pay for them. A pass that cannot handle its
input raises :class:`PassError` with a reason a person can act on; the job turns it into an
``optimization.failed`` event.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

SourceKind = Literal["onnx", "hf-safetensors", "gguf"]
TaskKind = Literal["feature-extraction", "text-generation", "text-classification"]


class PassError(Exception):
    """The pass cannot produce a model from this input; the message says why and what to do."""


class JobCancelled(Exception):
    """The job was cancelled between two steps."""


class PassConfig(BaseModel):
    """Base of every pass config: strict (a typo in a profile is an error, not a default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class SourceModel:
    """The published artifact, unpacked: what ``convert`` starts from."""

    kind: SourceKind
    path: Path  # an .onnx file, a Hugging Face folder, or a .gguf file
    task: TaskKind
    digest: str


@dataclass(frozen=True)
class OnnxModel:
    """An ONNX model on disk: ``path`` plus any external-data files in the same folder."""

    path: Path

    @property
    def size_bytes(self) -> int:
        """The model file and its external data (everything in its own folder)."""
        return sum(p.stat().st_size for p in self.path.parent.iterdir() if p.is_file())


@dataclass
class PassContext:
    """What a pass may use besides its input: the job's folder, the source, sample inputs."""

    work_dir: Path
    source: SourceModel
    samples: Any = None  # slmops_optimizer.samples.SampleSet; convert builds it
    tokenizer: Any = None  # a transformers tokenizer, when the source has one
    reference: Any = None  # slmops.objectstore.BlobRef of the stored fp32 conversion
    generation: Any = None  # slmops.generation.GenerationSpec of a decoder; convert sets it
    texts: list[str] = field(default_factory=list)  # sample texts (eval set or built-in)
    texts_origin: str = "built-in"
    sample_size: int = 32  # texts (encoders) or windows (decoders) in the sample set
    intra_op_threads: int = 1
    log: list[str] = field(default_factory=list)
    is_cancelled: Callable[[], bool] = lambda: False
    metrics: dict[str, float] = field(default_factory=dict)
    #: Structured facts for the variant's manifest (JSON-ready), e.g. gguf_blocks' tensor_map.
    details: dict[str, Any] = field(default_factory=dict)
    _steps: int = 0

    def note(self, message: str) -> None:
        self.log.append(message)

    def output_dir(self, step: str) -> Path:
        """A fresh folder for one step's output (external data lands beside the model); a
        step that runs again (a search refinement) gets a new one."""
        self._steps += 1
        folder = self.work_dir / f"{self._steps:02d}-{step}"
        folder.mkdir(parents=True, exist_ok=False)
        return folder

    def check_cancelled(self) -> None:
        if self.is_cancelled():
            raise JobCancelled("cancelled")


@dataclass(frozen=True)
class Refinement:
    """A more conservative config to try when a candidate misses its quality floor."""

    description: str  # what changed, for the search trail ("asymmetric", "lm_head kept fp32")
    config: PassConfig
    #: Some weights stay fp32: useless for a class that runs no fp32 (an INT8-only NPU).
    keeps_fp32: bool = False


C = TypeVar("C", bound=PassConfig)


class Pass(ABC, Generic[C]):
    """One optimization step. Subclasses set ``name`` and ``config_class`` and implement run."""

    name: ClassVar[str]
    config_class: ClassVar[type[PassConfig]]
    #: True for the pass that reads the source artifact rather than an ONNX model.
    reads_source: ClassVar[bool] = False

    def __init__(self, config: C) -> None:
        self.config = config

    @classmethod
    def from_config(cls, raw: dict[str, object]) -> Pass[Any]:
        try:
            config = cls.config_class.model_validate(raw)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '<config>'}: {err['msg']}"
                for err in exc.errors()
            )
            raise PassError(f"pass {cls.name!r}: invalid config: {problems}") from exc
        return cls(config)  # type: ignore[arg-type]

    def refinements(self, model: OnnxModel, ctx: PassContext) -> list[Refinement]:
        """A ladder of ever more conservative configs, each including the previous steps, tried
        in order by the accuracy-aware search; ``model`` is this pass's input. None by default.
        """
        return []

    @abstractmethod
    def run(self, model: OnnxModel | None, ctx: PassContext) -> OnnxModel:
        """Produce a new model in ``ctx.output_dir(...)``; ``model`` is None only for a pass
        that ``reads_source``."""
