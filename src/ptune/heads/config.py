"""HeadConfig: a head's shape, validated against its kind in the registry (above every head module)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import ConfigError
from .base import POOLINGS
from .registry import head_kind

if TYPE_CHECKING:
    from .base import HeadKind


@dataclass(frozen=True)
class HeadConfig:
    """A head's shape: its kind (see ``ptune.heads.HEAD_KINDS``) and the few settings heads read."""

    kind: str = "classification"
    num_labels: int = 0
    label_word_ids: tuple[int, ...] = ()  # verbalizer: first token id of each label word
    pooling: str = "auto"  # classification: auto (cls for encoders, last for decoders) | cls | pooler | mean | last
    dropout: float = 0.1

    def __post_init__(self) -> None:
        object.__setattr__(self, "label_word_ids", tuple(int(i) for i in self.label_word_ids))
        if self.pooling not in POOLINGS:
            raise ConfigError(f"pooling={self.pooling!r} is not one of {POOLINGS}")
        head_kind(self.kind).check_config(self)

    @property
    def spec(self) -> "HeadKind":
        return head_kind(self.kind)
