"""Every device profile's recipes checked against the pass registry when the optimizer starts:
a pass name with a typo, or a config a pass refuses, stops the service at start-up with the
profile, recipe and pass named, instead of failing each job that plans that recipe later."""

from __future__ import annotations

from collections.abc import Mapping

from slmops.profiles import DeviceProfile, ProfileError
from slmops_optimizer.passes import PassError, create_pass


def recipe_problems(profiles: Mapping[str, DeviceProfile]) -> list[str]:
    """One line per pass a recipe names that the registry does not have, or cannot configure
    as given (the passes are only configured here, never run)."""
    problems: list[str] = []
    for profile in profiles.values():
        for recipe in profile.recipes:
            for index, spec in enumerate(recipe.passes):
                try:
                    create_pass(spec.name, dict(spec.config))
                except PassError as exc:
                    where = f"profile {profile.name}, recipe {recipe.name}, pass {index + 1}"
                    problems.append(f"{where} ({spec.name!r}): {exc}")
    return problems


def check_recipes(profiles: Mapping[str, DeviceProfile]) -> None:
    """Raise :class:`ProfileError` naming every recipe pass the optimizer could not run."""
    if problems := recipe_problems(profiles):
        raise ProfileError(
            "device profile recipes the optimizer cannot run:\n" + "\n".join(problems)
        )
