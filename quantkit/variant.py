"""A variant as the engines receive it: its name, format, place on the Hub and settings.

Neutral: plan.py makes these, the engines read them, and nothing here imports a stage, so the
engines below the stages can name the type without a cycle (DESIGN §2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict


class ParamsModel(BaseModel):
    """Base of every format's settings model: frozen, and an unknown key is an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # Recipe keys a "before" validator turns into fields (a name that reads better in one case).
    recipe_aliases: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def recipe_keys(cls) -> list[str]:
        return [*cls.model_fields, *cls.recipe_aliases]


P = TypeVar("P", bound=ParamsModel, covariant=True)


@dataclass(frozen=True)
class Variant(Generic[P]):
    """One expanded [[variants]] entry, named; `params` is its format's settings model."""

    name: str
    format: str
    repo: str  # "{owner}/..." stays a placeholder until the owner is known
    branch: str
    params: P
    index: int  # the [[variants]] entry it came from

    def params_dict(self) -> dict[str, Any]:
        return self.params.model_dump()
