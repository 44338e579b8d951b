"""The configs shipped with the tool: list them (``gif configs``), copy one (``gif init``)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

from gifcli.errors import GifError
from gifcli.outputs import check_output_file, write_text

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass(frozen=True)
class ShippedConfig:
    """A ready-to-run config: its name (file stem), path and the summary of its first line."""

    name: str
    path: Path
    summary: str


def shipped_configs() -> list[ShippedConfig]:
    """Every shipped config, by name."""
    configs = []
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        configs.append(ShippedConfig(path.stem, path, _summary(path.read_text())))
    return configs


def _summary(text: str) -> str:
    """The first sentence of the config's leading comment."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    comment = " ".join(lines)
    end = comment.find(". ")
    return comment if end < 0 else comment[: end + 1]


def find_config(name: str) -> ShippedConfig:
    """The shipped config called ``name`` (with or without ``.yaml``)."""
    stem = name.removesuffix(".yaml")
    configs = {config.name: config for config in shipped_configs()}
    if stem not in configs:
        hint = difflib.get_close_matches(stem, list(configs), n=1)
        suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
        raise GifError(
            f"{name}: no shipped config of that name{suggestion} (`gif configs` lists them: "
            f"{', '.join(configs)})"
        )
    return configs[stem]


def init_config(name: str, output: Path | None = None, *, force: bool = False) -> Path:
    """Copy the shipped config ``name`` to ``output`` (default ``NAME.yaml`` here) to edit."""
    config = find_config(name)
    output = output or Path(f"{config.name}.yaml")
    check_output_file(output, force=force)
    write_text(output, config.path.read_text())
    return output
