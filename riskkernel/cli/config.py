"""`rk config`: the settings in effect and where each came from; a commented starter config file.

Both commands take `rk run`'s own options, not copies of them: the run command's click parameters parse
what follows `rk config show` exactly as `rk run` would parse it (command line, then the `RK_*` variable,
then the config file as click's default map, then the option's default), and click's record of which of
these gave each value is the answer `rk config show` prints. The option help texts become the comments
of the file `rk config init` writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from typer._click import Context, Parameter

app = typer.Typer(
    help="Show the settings in effect and where each came from, or write a starter config file.",
    no_args_is_help=True,
)

# Both commands pass the options they do not know themselves on to `rk run`'s option parser.
TAKES_RUN_OPTIONS = {"allow_extra_args": True, "ignore_unknown_options": True}
RUN_OPTIONS_METAVAR = "[OPTIONS] [RUN OPTIONS]"
JSON = typer.Option("--json", help="Print JSON.")


@dataclass(frozen=True)
class Setting:
    key: str
    value: Any  # as JSON has it: str, int, float, bool, list of str, or None
    source: str  # flag | env | file | default
    origin: str | None  # the flag, the variable, or the file; for a default, None (or how it was found)


def source_label(ctx: Context, name: str) -> str:
    """Where the value of a command's setting came from, as errors and price sources name it: `--price`,
    `RK_PRICE`, `[prices] in /path/rk.toml`, or `default`."""
    from riskkernel import paths
    from riskkernel.config import TABLES

    source, origin = _source(ctx, name, paths.config_file())
    if source == "file":
        return f"{f'[{TABLES[name]}]' if name in TABLES else name} in {origin}"
    return origin or source


def _source(ctx: Context, name: str, file: Path | None) -> tuple[str, str | None]:
    param = next(p for p in ctx.command.params if p.name == name)
    source = ctx.get_parameter_source(name)
    kind = source.name if source is not None else "DEFAULT"  # click's ParameterSource, by name
    if kind == "COMMANDLINE":
        return "flag", param.opts[0]
    if kind == "ENVIRONMENT":
        return "env", str(param.envvar)
    if kind == "DEFAULT_MAP" and file is not None:
        return "file", str(file.absolute())
    return "default", None


def _run_options(ctx: typer.Context) -> list[Parameter]:
    """`rk run`'s options for the settings (config.ENV), in that order."""
    from typer.core import TyperGroup

    from riskkernel.config import ENV

    root = ctx.find_root()
    assert isinstance(root.command, TyperGroup)
    run = root.command.get_command(root, "run")
    assert run is not None
    by_name = {param.name: param for param in run.params}
    return [by_name[key] for key in ENV]


def _parse(ctx: typer.Context, default_map: dict[str, Any]) -> Context:
    """What follows this command, parsed by `rk run`'s options, with a config file's default map."""
    from typer.core import TyperCommand

    parser = TyperCommand(None, params=_run_options(ctx), add_help_option=False)
    return parser.make_context(ctx.command_path, list(ctx.args), default_map=default_map)


def _json_value(value: Any) -> Any:
    from enum import Enum

    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [_json_value(v) for v in value]
    if isinstance(value, str):
        from riskkernel.providers import redact

        return redact(value, limit=None)  # a key in an upstream URL or a tag is never printed
    return value


def effective_settings(ctx: typer.Context) -> tuple[Path | None, list[Setting]]:
    """The config file in effect, and each setting's value and where it came from."""
    from riskkernel import paths
    from riskkernel.config import load_file

    file = paths.config_file()
    parsed = _parse(ctx, load_file(file)["run"] if file else {})
    settings = []
    for param in _run_options(ctx):
        key = str(param.name)
        value = parsed.params[key]
        source, origin = _source(parsed, key, file)
        if key == "prices_file" and value is None:
            found = paths.prices_file()
            value, origin = (found.absolute(), "found") if found else (None, None)
        settings.append(Setting(key, _json_value(value), source, origin))
    return file, settings


def _looked_for(name: str, user: Path) -> str:
    return f"none (looked for ./{name}, then {user})"


@app.command("show", context_settings=TAKES_RUN_OPTIONS, options_metavar=RUN_OPTIONS_METAVAR)
def show(ctx: typer.Context, as_json: Annotated[bool, JSON] = False) -> None:
    """The settings `rk run` would use here, and where each came from: flag, env (RK_*), file, or default.

    Also takes `rk run`'s options (`rk config show --max-cost 1`), shown with the flag as their source.
    """
    from riskkernel import paths
    from riskkernel.models import dumps

    file, settings = effective_settings(ctx)
    if as_json:
        data = {
            "config_file": str(file.absolute()) if file else None,
            "settings": {s.key: {"value": s.value, "source": s.source, "from": s.origin} for s in settings},
        }
        print(dumps(data))
        return
    header = str(file.absolute()) if file else _looked_for("rk.toml", paths.user_config_file())
    rows = [("setting", "value", "source")]
    for s in settings:
        rows.append((s.key, _text(s.value), s.source if s.source in ("file", "default") else f"{s.source} {s.origin}"))
    width = [max(len(row[i]) for row in rows) for i in (0, 1)]
    print(f"config file: {header}")
    for key, value, source in rows:
        print(f"{key.ljust(width[0])}   {value.ljust(width[1])}   {source}")


def _text(value: Any) -> str:
    if value is None or value == []:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return " ".join(value)
    return str(value)


@app.command("init", context_settings=TAKES_RUN_OPTIONS, options_metavar=RUN_OPTIONS_METAVAR)
def init(
    ctx: typer.Context,
    user: Annotated[bool, typer.Option("--user", help="Write the user config file instead of ./rk.toml.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite the file if it exists.")] = False,
) -> None:
    """Write a starter rk.toml here (or the user config file), every setting listed with what it does.

    Settings are commented out at their defaults; `rk run` options given here are written in: `--max-cost 1`.
    """
    from riskkernel import paths
    from riskkernel.cli import output

    target = paths.user_config_file() if user else Path("rk.toml")
    if target.exists() and not force:
        output.error(f"rk: {target.absolute()} already exists; pass --force to overwrite it")
        raise typer.Exit(1)
    text = render(ctx, _parse(ctx, {}), absolute_paths=user)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    print(f"Wrote {target.absolute()}. See what is in effect with: rk config show")


EXAMPLES: dict[str, Any] = {
    "name": "nightly-evals",
    "prices_file": "prices.toml",
    "price": ["my-finetune=2.50:10.00:1.25"],
    "tag": ["team=search"],
}
# What the file's tables hold (their flags' help is about repeating the flag).
TABLE_HELP = {
    "price": 'Model prices, which win over the prices file and genai-prices: "MODEL" = "IN:OUT[:CACHED_IN]" '
    "in USD per 1M tokens.",
    "tag": 'Tags for every run, kept in the ledger: KEY = "VALUE".',
}


def render(ctx: typer.Context, parsed: Context, absolute_paths: bool = False) -> str:
    """A config file listing every setting with its option's help, commented out at its default (or an
    example) unless it was given on the command line."""
    import textwrap

    import tomli_w

    from riskkernel import paths
    from riskkernel.config import TABLES, parse_tags
    from riskkernel.pricing import parse_price_flag
    from riskkernel.providers.catalog import PROVIDERS

    examples = {**EXAMPLES, **{f"{p.name}_upstream": p.default_upstream for p in PROVIDERS}}
    lines = [
        "# rk (riskkernel) settings, written by `rk config init`.",
        f"# rk reads ./rk.toml if present, else {paths.user_config_file()}.",
        "# Flags and RK_* environment variables win over this file; `rk config show` shows what is in effect.",
        "# A setting commented out is at its default (or shows an example): uncomment it to set it.",
    ]
    tables = []
    for param in _run_options(ctx):
        key = str(param.name)
        given = _source(parsed, key, None)[0] == "flag"
        value = _json_value(parsed.params[key] if given else param.default)
        if value is None or value == []:
            value = examples[key]
        if key == "prices_file" and given and absolute_paths:
            value = str(Path(value).absolute())
        about = f"{TABLE_HELP.get(key) or getattr(param, 'help', None)} ({param.opts[0]}, {param.envvar})"
        comment = textwrap.wrap(about, width=100, initial_indent="# ", subsequent_indent="# ")
        if key in TABLES:
            if key == "price" and given:
                for text in value:
                    parse_price_flag(text)  # refuse to write a price rk run would refuse to read
            items = parse_tags(value)  # KEY=VALUE items, as `--price` and `--tag` take them
            body = tomli_w.dumps({TABLES[key]: items}).strip().splitlines()
            tables.append(["", *comment, *(line if given else f"# {line}" for line in body)])
        else:
            line = tomli_w.dumps({key: value}).strip()
            lines += ["", *comment, line if given else f"# {line}"]
    for table in tables:  # after every plain key: in TOML, a key after a table header belongs to the table
        lines += table
    return "\n".join(lines) + "\n"
