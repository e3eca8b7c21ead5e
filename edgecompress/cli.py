"""The `edgecompress` command: parse options, call one API function, print. No logic here."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from edgecompress.errors import EdgeCompressError


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _parse_classes(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is not a comma-separated list of class numbers, e.g. 0,1,5"
        ) from None


def _progress() -> tuple[Any, Callable[[str, float | None], None]]:
    """A rich progress display and the callback the library reports through."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=_stderr_console(),
        transient=True,
    )
    tasks: dict[str, Any] = {}

    def report(stage: str, fraction: float | None) -> None:
        if stage not in tasks:
            tasks[stage] = progress.add_task(stage, total=1.0 if fraction is not None else None)
        if fraction is not None:
            progress.update(tasks[stage], completed=fraction)

    return progress, report


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgecompress")
def cli() -> None:
    """Compress trained CNNs for edge devices, judged by measured latency, memory and size."""


def main() -> None:
    """Console entry point: expected failures become one line on stderr and a non-zero exit."""
    try:
        cli.main(standalone_mode=False)
    except EdgeCompressError as err:
        _fail(str(err), err.exit_code)
    except click.exceptions.Abort:
        _fail("aborted", 130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", 130)


def _echo_json(record: dict[str, Any]) -> None:
    click.echo(json.dumps(record, indent=None, sort_keys=False))


_ = Path  # used by commands below
