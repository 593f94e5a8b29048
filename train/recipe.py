"""`CaptionRecipe`: what a caption run does beyond the stock Trainer, described once.

`CaptionTrainer` runs it, `TrainConfig` (the command line's settings) and the shapes demo's `DemoSettings` each
carry its fields under the same names and hand it over with `CaptionRecipe.of(settings)`, so a new step of the
recipe is added here and reaches all three.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

VISION_WARMUP_TARGETS = ("words", "word_pairs")  # what the vision warm-up names (vision_warmup.py)


@dataclass(frozen=True)
class CaptionRecipe:
    """Per-part learning rates, the short-captions-first curriculum and the vision warm-up.

    Args:
        projector_lr: learning rate of the `multi_modal_projector` parameters;
        vision_lr: learning rate of the `vision_tower` parameters, when they train. Both default to the
            Trainer's `learning_rate`, which the language model uses. Only parameters with `requires_grad`
            reach the optimizer.
        curriculum_steps, curriculum_fraction, curriculum_grow: the first steps draw from the shortest captions
            only (`curriculum.py`);
        vision_warmup_steps: the first steps train the vision tower alone (`vision_warmup.py`);
        vision_warmup_target: what it names, "words" or "word_pairs" (`vision_warmup.py`);
        vision_aux_weight: after the warm-up, its loss stays on at this weight beside the caption loss, on the
            caption pass's own vision features (`vision_warmup.py`). The logged `loss` stays the caption loss;
            the auxiliary term is logged as `vision_aux_loss`.
    """

    projector_lr: float | None = None
    vision_lr: float | None = None
    curriculum_steps: int = 0
    curriculum_fraction: float = 0.25
    curriculum_grow: bool = False
    vision_warmup_steps: int = 0
    vision_warmup_target: str = "words"
    vision_aux_weight: float = 0.0

    def __post_init__(self):
        if self.curriculum_steps < 0 or self.vision_warmup_steps < 0 or self.vision_aux_weight < 0:
            raise ValueError(
                "curriculum_steps, vision_warmup_steps and vision_aux_weight must be >= 0, got "
                f"{self.curriculum_steps}, {self.vision_warmup_steps} and {self.vision_aux_weight}."
            )
        if not 0 < self.curriculum_fraction <= 1:
            raise ValueError(f"curriculum_fraction must be in (0, 1], got {self.curriculum_fraction}.")
        if self.vision_warmup_target not in VISION_WARMUP_TARGETS:
            raise ValueError(
                f"vision_warmup_target must be {' or '.join(map(repr, VISION_WARMUP_TARGETS))}, "
                f"got {self.vision_warmup_target!r}."
            )

    @property
    def trains_vision_alone(self) -> bool:
        """Whether the warm-up (or its auxiliary loss) trains the vision tower through its own head."""
        return bool(self.vision_warmup_steps or self.vision_aux_weight)

    @classmethod
    def of(cls, settings: Any) -> CaptionRecipe:
        """The recipe held by `settings` (a `TrainConfig`, a `DemoSettings`, ...) under the same field names; a
        field that `settings` lacks keeps its default."""
        defaults = cls()
        return cls(**{f.name: getattr(settings, f.name, getattr(defaults, f.name)) for f in dataclasses.fields(cls)})

    def as_settings(self) -> dict[str, Any]:
        """The recipe as keyword arguments of `TrainConfig`."""
        return dataclasses.asdict(self)
