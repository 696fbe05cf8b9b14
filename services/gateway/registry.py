"""The models the gateway serves.

In memory for now, filled from the settings (or by tests); the control plane's database
takes its place later behind the same two methods.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from libs.common.errors import ModelNotFoundError


@dataclass(frozen=True)
class ModelEntry:
    name: str
    # unix time (s) the model was registered, OpenAI's `created`
    created: int = field(default_factory=lambda: int(time.time()))
    owned_by: str = "hydraserve"


class ModelRegistry:
    def __init__(self, names: list[str] | None = None) -> None:
        self._models: dict[str, ModelEntry] = {}
        for name in names or []:
            self.add(name)

    def add(self, name: str) -> ModelEntry:
        entry = self._models.setdefault(name, ModelEntry(name))
        return entry

    def list(self) -> list[ModelEntry]:
        return sorted(self._models.values(), key=lambda entry: entry.name)

    def get(self, name: str) -> ModelEntry:
        """The model called `name`; ModelNotFoundError if it is not served."""
        entry = self._models.get(name)
        if entry is None:
            raise ModelNotFoundError(
                f"The model `{name}` does not exist or you do not have access to it.",
                param="model")
        return entry
