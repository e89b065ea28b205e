"""All of rk's terminal output: the one stderr console, the cost table, money and counts for people.

`rk run` writes only to stderr (stdout belongs to the child). Other commands print their results to stdout.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, TextIO

from rich import box
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from riskkernel.models import Budget, CallRecord, RunRecord

if TYPE_CHECKING:
    from riskkernel.ledger.store import Held, ModelLine

stderr = Console(stderr=True, highlight=False, soft_wrap=True)


def stdout() -> Console:
    return Console(highlight=False, soft_wrap=True)


def error(message: str) -> None:
    """One line, never a traceback."""
    print(message if message.startswith("rk: ") else f"rk: {message}", file=sys.stderr)


def money(amount: Decimal) -> str:
    if 0 < amount < Decimal("0.0001"):
        return f"${amount:.6f}"
    return f"${amount:.4f}"


def count(n: int) -> str:
    return f"{n:,}"


def duration(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def budget_summary(budget: Budget) -> str:
    parts = []
    if budget.max_cost is not None:
        parts.append(f"cost ${budget.max_cost}")
    if budget.max_tokens is not None:
        parts.append(f"tokens {count(budget.max_tokens)}")
    if budget.max_calls is not None:
        parts.append(f"calls {count(budget.max_calls)}")
    if budget.max_time is not None:
        parts.append(f"time {duration(budget.max_time)}")
    if budget.max_repeats is not None:
        parts.append(f"repeats {budget.max_repeats}")
    summary = ", ".join(parts) or "unlimited"
    return f"{summary} (strict)" if budget.strict else summary


def elapsed(run: RunRecord) -> float:
    if run.ended_at is None:
        return 0.0
    start = datetime.fromisoformat(run.started_at)
    return (datetime.fromisoformat(run.ended_at) - start).total_seconds()


@dataclass(frozen=True, slots=True)
class Used:
    """One budget dimension: how much of its limit a run used."""

    name: str
    share: float  # of the limit, 1.0 = all of it
    text: str


def budget_usage(run: RunRecord) -> list[Used]:
    b, t = run.budget, run.totals
    used = []
    if b.max_cost is not None:
        share = float(t.cost / b.max_cost) if b.max_cost else (1.0 if t.cost else 0.0)
        used.append(Used("cost", share, f"{money(t.cost)} of ${b.max_cost}"))
    if b.max_tokens is not None:
        share = t.usage.total_tokens / b.max_tokens if b.max_tokens else 1.0
        used.append(Used("tokens", share, f"{count(t.usage.total_tokens)} of {count(b.max_tokens)}"))
    if b.max_calls is not None:
        used.append(Used("calls", t.calls / b.max_calls if b.max_calls else 1.0, f"{t.calls} of {b.max_calls}"))
    if b.max_time is not None:
        spent = elapsed(run)
        share = spent / b.max_time if b.max_time else 1.0
        used.append(Used("time", share, f"{duration(spent)} of {duration(b.max_time)}"))
    return used


BAR = 20
COMPACT_BELOW = 72  # columns: narrower terminals get the one-line form


def _bar(share: float) -> Text:
    filled = min(round(share * BAR), BAR)
    style = "red" if share >= 1 else "yellow" if share >= 0.8 else "green"
    return Text("█" * filled, style=style) + Text("░" * (BAR - filled), style="dim")


def _status(run: RunRecord) -> str:
    return f"halted: {run.halt_reason}" if run.halt_reason else str(run.status)


def held_notes(held: Held) -> list[str]:
    """What the table says of the calls rk refused or clamped: reserved against actual, in a line each."""
    notes = []
    if held.refused:
        note = f"{held.refused} call{'s' if held.refused != 1 else ''} refused by rk, never sent upstream"
        if held.short:
            note += (
                f"; {held.short} because their worst case (up to {money(held.largest_short)}) did not fit what the"
                " budget had left"
            )
        notes.append(note + ".")
    if held.clamped:
        notes.append(
            f"{held.clamped} call{'s' if held.clamped != 1 else ''} had their output limit lowered to fit the budget"
            " (--strict)."
        )
    return notes


def cost_table(run: RunRecord, lines: list[ModelLine], held: Held, width: int | None = None) -> Group:
    """The table `rk run` prints on exit: per model, totals, each budget as a bar of used/limit, the halt;
    on a terminal narrower than COMPACT_BELOW columns, one line."""
    if width is not None and width < COMPACT_BELOW:
        return Group(compact_line(run, lines))
    head = Text(f"rk · run {run.run_id[:8]} · {_status(run)} · {duration(elapsed(run))}")
    if run.exit_status is not None:
        head.append(f" · exit {run.exit_status}")
    if run.halt_reason:
        head.stylize("bold red")

    savings = sum((line.cache_savings for line in lines), Decimal(0))
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("model")
    columns = ["calls", "input", "cached", "output", "cost"] + (["saved"] if savings else [])
    for name in columns:
        table.add_column(name, justify="right")
    for line in lines:
        cost = Text(money(line.cost))
        label = Text(line.model)
        if line.unpriced:
            label.append(" UNPRICED", style="bold red")
            cost = Text("unpriced", style="bold red")
        elif line.estimated:
            cost = Text("~" + money(line.cost))
        u = line.usage
        cells = [count(line.calls), count(u.input_tokens), count(u.cached_input_tokens), count(u.output_tokens)]
        table.add_row(label, *cells, cost, *([money(line.cache_savings)] if savings else []))
    t = run.totals
    table.add_section()
    table.add_row(
        Text("total", style="bold"),
        count(t.calls),
        count(t.usage.input_tokens),
        count(t.usage.cached_input_tokens),
        count(t.usage.output_tokens),
        Text(money(t.cost), style="bold"),
        *([money(savings)] if savings else []),
    )
    notes = []
    if any(line.unpriced for line in lines):
        notes.append(Text("UNPRICED models were charged $0: their real cost is unknown to rk.", style="bold red"))
    if any(line.estimated for line in lines):
        notes.append(Text("~ some usage was estimated (a stream was cut, or the upstream reported none)."))
    if savings:
        notes.append(Text(f"saved: what cache reads saved over the input price ({money(savings)} in all)."))
    notes.extend(Text(note) for note in held_notes(held))
    used = budget_usage(run)
    if not used:
        return Group(head, table, *notes, Text("budget: unlimited"))
    bars = Table.grid(padding=(0, 1))
    for _ in range(5):
        bars.add_column()
    for i, dim in enumerate(used):
        bars.add_row("budget" if i == 0 else "", dim.name, _bar(dim.share), dim.text, f"{dim.share:.0%}")
    return Group(head, table, *notes, bars)


def compact_line(run: RunRecord, lines: list[ModelLine]) -> Text:
    """The whole table in one line, for narrow terminals."""
    line = Text(f"rk {run.run_id[:8]} · {_status(run)} · {count(run.totals.calls)} calls · {money(run.totals.cost)}")
    if run.budget.max_cost is not None:
        line.append(f" of ${run.budget.max_cost}")
    if run.exit_status is not None:
        line.append(f" · exit {run.exit_status}")
    if any(m.unpriced for m in lines):
        line.append(" · UNPRICED calls", style="bold red")
    elif any(m.estimated for m in lines):
        line.append(" · ~estimated")
    if run.halt_reason:
        line.stylize("bold red", 0, len(line.plain))
    return line


def markdown_summary(run: RunRecord, lines: list[ModelLine], held: Held) -> str:
    """The cost table as GitHub-flavoured Markdown, for a CI job summary (`GITHUB_STEP_SUMMARY`)."""
    title = run.name or " ".join(run.command)
    out = [
        f"### rk · {_md(title)} · {_md(_status(run))}",
        "",
        "| model | calls | input | cached | output | cost |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for line in lines:
        u = line.usage
        cost = "unpriced" if line.unpriced else ("~" if line.estimated else "") + money(line.cost)
        cells = (_md(line.model), count(line.calls), count(u.input_tokens), count(u.cached_input_tokens))
        out.append(f"| {' | '.join(cells)} | {count(u.output_tokens)} | {cost} |")
    t = run.totals
    usage = t.usage
    out.append(
        f"| **total** | {count(t.calls)} | {count(usage.input_tokens)} | {count(usage.cached_input_tokens)}"
        f" | {count(usage.output_tokens)} | **{money(t.cost)}** |"
    )
    out.append("")
    used = budget_usage(run)
    out.append("Budget: " + (" · ".join(f"{d.name} {d.text} ({d.share:.0%})" for d in used) if used else "unlimited"))
    if run.halt_reason:
        out.append(f"\n**Halted: `{run.halt_reason}`** — later calls were refused (HTTP 402).")
    out.extend(f"\n{note}" for note in held_notes(held))
    if any(line.unpriced for line in lines):
        out.append("\n**Unpriced models were charged $0: their real cost is unknown to rk.**")
    out.append(f"\nRun `{run.run_id}`" + (f", exit status {run.exit_status}" if run.exit_status is not None else ""))
    return "\n".join(out) + "\n\n"


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def write_calls(out: TextIO, calls: Iterable[CallRecord], *, aligned: bool) -> None:
    """A run's calls a line each, as they come from the ledger: aligned columns under a header on a
    terminal, tab-separated without one when piped."""
    header = ("seq", "model", "stream", "status", "input", "cached", "output", "cost", "reserved", "ms", "flags")
    widths = (6, 28, 6, 6, 10, 10, 10, 12, 12, 8, 0)
    if aligned:
        out.write(_aligned(header, widths) + "\n")
    batch = []
    for call in calls:
        u = call.usage
        row = (
            str(call.seq),
            call.model or call.requested_model or "?",
            "yes" if call.stream else "",
            str(call.status),
            count(u.input_tokens),
            count(u.cached_input_tokens),
            count(u.output_tokens),
            money(call.cost),
            "" if call.reserved is None else money(call.reserved),
            f"{call.latency_ms:.0f}",
            ",".join(call.flags)
            + (f" output {call.output_limit}" if call.output_limit is not None else "")
            + (f" {call.error}" if call.error else ""),
        )
        batch.append(_aligned(row, widths) if aligned else "\t".join(row))
        if len(batch) >= 500:
            out.write("\n".join(batch) + "\n")
            batch.clear()
    if batch:
        out.write("\n".join(batch) + "\n")
    out.flush()


def _aligned(cells: tuple[str, ...], widths: tuple[int, ...]) -> str:
    parts = []
    for i, (cell, width) in enumerate(zip(cells, widths, strict=True)):
        parts.append(cell.ljust(width) if i in (1, 10) else cell.rjust(width))
    return "  ".join(parts).rstrip()
