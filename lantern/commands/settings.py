"""lantern settings: every setting with its environment variable, default and meaning."""

from __future__ import annotations

import argparse

HELP = "Show every setting: environment variable, current value, default and meaning."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--markdown", action="store_true", help="print the README's table (defaults only)"
    )


def settings_table() -> list[tuple[str, str, str]]:
    """(environment variable, default, description) for every setting, in declaration order."""
    from pydantic import AliasChoices

    from lantern.core.settings import Settings

    rows = []
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        env = (
            str(alias.choices[0])
            if isinstance(alias, AliasChoices)
            else f"{Settings.model_config.get('env_prefix', '')}{name}".upper()
        )
        rows.append((env, str(field.default), field.description or ""))
    return rows


def markdown_table() -> str:
    lines = ["| variable | default | meaning |", "| --- | --- | --- |"]
    lines += [f"| `{env}` | `{default}` | {desc} |" for env, default, desc in settings_table()]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.markdown:
        print(markdown_table())
        return 0
    from lantern.core.settings import get_settings

    current = get_settings().model_dump()
    for (env, default, desc), value in zip(settings_table(), current.values(), strict=True):
        marker = "" if str(value) == default else "   (set)"
        print(f"{env}={value}{marker}\n    {desc}")
    return 0
