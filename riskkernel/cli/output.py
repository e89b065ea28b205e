"""All of rk's terminal output: the one stderr console, the cost table, money and counts for people.

`rk run` writes only to stderr (stdout belongs to the child). Other commands print their results to stdout.
"""

from __future__ import annotations

import sys
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING

from rich import box
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from riskkernel.models import Budget, RunRecord

if TYPE_CHECKING:
    from riskkernel.ledger.store import ModelLine

stderr = Console(stderr=True, highlight=False, soft_wrap=True)


def stdout() -> Console:
    return Console(highlight=False, soft_wrap=True)


def error(message: str) -> None:
    """One line, never a traceback."""
    print(message if message.startswith("rk") else f"rk: {message}", file=sys.stderr)


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
    return ", ".join(parts) or "unlimited"


def elapsed(run: RunRecord) -> float:
    if run.ended_at is None:
        return 0.0
    start = datetime.fromisoformat(run.started_at)
    return (datetime.fromisoformat(run.ended_at) - start).total_seconds()


def budget_usage(run: RunRecord) -> list[str]:
    b, t = run.budget, run.totals
    used = []
    if b.max_cost is not None:
        share = f" ({t.cost / b.max_cost:.0%})" if b.max_cost else ""
        used.append(f"cost {money(t.cost)} of ${b.max_cost}{share}")
    if b.max_tokens is not None:
        used.append(f"tokens {count(t.usage.total_tokens)} of {count(b.max_tokens)}")
    if b.max_calls is not None:
        used.append(f"calls {t.calls} of {b.max_calls}")
    if b.max_time is not None:
        used.append(f"time {duration(elapsed(run))} of {duration(b.max_time)}")
    return used


def cost_table(run: RunRecord, lines: list[ModelLine], refused: int) -> Group:
    """The table `rk run` prints on exit: per model, totals, each budget as used/limit, and the halt."""
    status = f"halted: {run.halt_reason}" if run.halt_reason else str(run.status)
    head = Text(f"rk · run {run.run_id[:8]} · {status} · {duration(elapsed(run))}")
    if run.exit_status is not None:
        head.append(f" · exit {run.exit_status}")
    if run.halt_reason:
        head.stylize("bold red")

    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("model")
    for name in ("calls", "input", "cached", "output", "cost"):
        table.add_column(name, justify="right")
    notes = []
    for line in lines:
        cost = Text(money(line.cost))
        label = Text(line.model)
        if line.unpriced:
            label.append(" UNPRICED", style="bold red")
            cost = Text("unpriced", style="bold red")
        elif line.estimated:
            cost = Text("~" + money(line.cost))
        u = line.usage
        table.add_row(
            label, count(line.calls), count(u.input_tokens), count(u.cached_input_tokens), count(u.output_tokens), cost
        )
    t = run.totals
    table.add_section()
    table.add_row(
        Text("total", style="bold"),
        count(t.calls),
        count(t.usage.input_tokens),
        count(t.usage.cached_input_tokens),
        count(t.usage.output_tokens),
        Text(money(t.cost), style="bold"),
    )
    if any(line.unpriced for line in lines):
        notes.append(Text("UNPRICED models were charged $0: their real cost is unknown to rk.", style="bold red"))
    if any(line.estimated for line in lines):
        notes.append(Text("~ some usage was estimated (a stream was cut, or the upstream reported none)."))
    if refused:
        notes.append(Text(f"{refused} call{'s' if refused != 1 else ''} refused by rk (402), never sent upstream."))
    used = budget_usage(run)
    footer = Text("budget: " + (" · ".join(used) if used else "unlimited"))
    return Group(head, table, *notes, footer)
