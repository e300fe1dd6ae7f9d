"""What the demo shows while it runs: a live view (rich) or plain lines.

The session hands the view a :class:`Frame` several times a second, an event
whenever something happens, and the summary at the end.  The rich view
redraws one screen in place; the plain view prints a status line every
second, the file map at each change of phase, and every event as it comes:
it is what a log file or a pipe gets.  rich is optional (``pip install
'aiopgalloc[demo]'``); without it the plain view is used.
"""

from __future__ import annotations

import collections
import importlib
import shutil
import sys
import textwrap
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TextIO

from .. import FileStats
from .demo_map import FREED, LIVE_BASE, NEVER_USED, RELEASED, CellMap

__all__ = [
    "Frame",
    "Header",
    "PlainView",
    "RichView",
    "View",
    "fmt_bytes",
    "rich_available",
]

MiB = 1 << 20
KiB = 1 << 10


def fmt_bytes(n: int | float) -> str:
    """``1.5 GiB``, ``12.0 MiB``, ``256 KiB`` or ``512 B``."""
    if abs(n) >= 1 << 30:
        return f"{n / (1 << 30):,.1f} GiB"
    if abs(n) >= MiB:
        return f"{n / MiB:,.1f} MiB"
    if abs(n) >= KiB:
        return f"{n / KiB:.0f} KiB"
    return f"{int(n)} B"


def rich_available() -> bool:
    """Whether the rich package can be imported."""
    try:
        importlib.import_module("rich")
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class Header:
    """What stays the same during a run."""

    backend: str
    seconds: float
    lines: tuple[str, ...]  # how pressure is made, the cgroup, the source
    phases: int


@dataclass(frozen=True)
class Frame:
    """One sample of everything the view shows."""

    t: float
    phase: int  # 1-based
    phase_name: str
    phase_text: str
    stats: FileStats
    cells: CellMap
    cache_entries: int
    cache_bytes: int
    cache_budget: int
    hit_ratio: float  # of the requests since the previous frame
    verified: int
    lru_dropped: int
    ops_per_s: float
    cgroup_usage: int | None
    cgroup_limit: int | None
    pressure_source: str


class View(Protocol):
    """What the session calls."""

    interval: float
    """Seconds between two frames."""
    cells: int
    """Cells in the file map."""

    def start(self, header: Header) -> None:
        """Show the header; called once, first."""

    def event(self, t: float, text: str, detail: str = "") -> None:
        """Something happened at ``t`` seconds (``detail``: more words, for
        the views with room for them)."""

    def frame(self, frame: Frame) -> None:
        """A new sample."""

    def finish(self, frame: Frame | None, summary: list[str]) -> None:
        """The run is over: show the last sample and the summary."""

    def stop(self) -> None:
        """Leave the display usable after an interruption (idempotent)."""


_PLAIN_CHARS = {NEVER_USED: ".", RELEASED: "-", FREED: "~"}
# One mark per MemoryKind, in its order: SYSTEM, ANONYMOUS, PAGE_CACHE, TMPFS, RAMDISKFS, MAPPED.
_PLAIN_LIVE = "%@#&&*"
_KIND_NAMES = ("system", "anonymous", "page cache", "tmpfs", "ramdiskfs", "mapped")


def _plain_cell(state: int) -> str:
    if state >= LIVE_BASE:
        return _PLAIN_LIVE[(state - LIVE_BASE) % len(_PLAIN_LIVE)]
    return _PLAIN_CHARS.get(state, "?")


def _usage_parts(stats: FileStats) -> list[tuple[str, int]]:
    usage = stats.usage.as_dict()
    return [
        (name, usage[name.replace(" ", "_")])
        for name in _KIND_NAMES
        if usage.get(name.replace(" ", "_"))
    ]


def status_line(frame: Frame) -> str:
    """One plain line with the main figures of ``frame``."""
    s = frame.stats
    hit = 100 * frame.hit_ratio
    parts = _usage_parts(s)
    unscanned = s.committed_bytes - s.usage.total
    if unscanned > 0:
        parts.append(("not yet scanned", unscanned))
    kinds = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in parts) or "nothing"
    pressure = s.pressure_low + s.pressure_medium + s.pressure_critical
    line = (
        f"cache {fmt_bytes(frame.cache_bytes)}, {frame.cache_entries:,} values, "
        f"{hit:.0f}% hits, {frame.ops_per_s:,.0f} req/s | committed "
        f"{fmt_bytes(s.committed_bytes)} of a {fmt_bytes(s.file_size)} file ({kinds}) | "
        f"pressure {pressure} | evicted {fmt_bytes(s.evictions.evicted_bytes)} | released "
        f"{fmt_bytes(s.bytes_released)}, recycled {fmt_bytes(s.recycled_bytes)}"
    )
    if frame.cgroup_usage is not None and frame.cgroup_limit:
        line += f" | cgroup {fmt_bytes(frame.cgroup_usage)} of {fmt_bytes(frame.cgroup_limit)}"
    return line


def map_line(cells: CellMap) -> str:
    """The file map in ASCII, one character per cell."""
    return "".join(_plain_cell(c) for c in cells.states)


MAP_LEGEND = (
    "'#' cache values  '@' session table  '~' freed, not yet released  '-' released  '.' never used"
)


class PlainView:
    """Plain lines: a status line every ``every`` seconds, every event as it
    comes, and the file map (one line of 64 cells) at each new phase."""

    def __init__(self, out: TextIO | None = None, every: float = 1.0) -> None:
        self.out = out if out is not None else sys.stdout
        self.interval = 0.25
        self.cells = 64
        self.every = every
        self._next = 0.0
        self._phase = 0
        self._width = max(60, min(100, shutil.get_terminal_size((100, 24)).columns))

    def _print(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def start(self, header: Header) -> None:
        """Print the header lines."""
        self._print(f"aiopgalloc demo on {header.backend}, about {header.seconds:g} s")
        for line in header.lines:
            self._print(
                textwrap.fill(line, self._width, initial_indent="  ", subsequent_indent="    ")
            )
        self._print(f"  file map legend (one character per cell): {MAP_LEGEND}")

    def event(self, t: float, text: str, detail: str = "") -> None:
        """Print the event at once."""
        self._print(f"[{t:5.1f} s] {text}" + (f": {detail}" if detail else ""))

    def frame(self, frame: Frame) -> None:
        """Print the map on a new phase, a status line every interval."""
        if frame.phase != self._phase:
            self._phase = frame.phase
            self._print_map(frame)
        if frame.t >= self._next:
            self._next = frame.t + self.every
            self._print(f"[{frame.t:5.1f} s] {status_line(frame)}")

    def _print_map(self, frame: Frame) -> None:
        cells = frame.cells
        self._print(
            f"[{frame.t:5.1f} s] file map, {fmt_bytes(cells.file_size)} "
            f"(one cell = {fmt_bytes(cells.cell_size)}): |{map_line(cells)}|"
        )

    def finish(self, frame: Frame | None, summary: list[str]) -> None:
        """The last status line and map, then the summary."""
        if frame is not None:
            self._print(f"[{frame.t:5.1f} s] {status_line(frame)}")
            self._print_map(frame)
        self._print()
        self._print("What happened:")
        for para in summary:
            self._print(
                textwrap.fill(para, self._width, initial_indent="  * ", subsequent_indent="    ")
            )

    def stop(self) -> None:
        """Nothing to undo for plain lines."""


class RichView:
    """One screen redrawn in place with rich (several times a second)."""

    def __init__(self, max_events: int = 8) -> None:
        self._rich = _RichModules()
        self.interval = 0.125
        self.cells = 256
        self._console: Any = self._rich.console.Console()
        self._live: Any = None
        self._header: Header | None = None
        self._events: collections.deque[tuple[float, str]] = collections.deque(maxlen=max_events)
        self._last: Frame | None = None

    def start(self, header: Header) -> None:
        """Print the header and start the live display."""
        self._header = header
        r = self._rich
        body = r.text.Text()
        for i, line in enumerate(header.lines):
            body.append(("\n" if i else "") + line)
        self._console.print(
            r.panel.Panel(body, title=f"aiopgalloc demo · {header.backend}", title_align="left")
        )
        self._live = r.live.Live(console=self._console, auto_refresh=False, transient=False)
        self._live.start()

    def event(self, t: float, text: str, detail: str = "") -> None:
        """Keep the event for the events panel (the detail is shown under
        the phase title already)."""
        self._events.append((t, text))

    def frame(self, frame: Frame) -> None:
        """Redraw with ``frame``."""
        self._last = frame
        if self._live is not None:
            self._live.update(self._render(frame), refresh=True)

    def finish(self, frame: Frame | None, summary: list[str]) -> None:
        """Draw the last frame, stop the live display, print the summary."""
        if frame is not None:
            self.frame(frame)
        if self._live is not None:
            self._live.stop()
            self._live = None
        r = self._rich
        body = r.text.Text()
        for i, para in enumerate(summary):
            body.append(("\n" if i else "") + "• " + para)
        self._console.print(r.panel.Panel(body, title="What happened", title_align="left"))

    def stop(self) -> None:
        """Stop the live display (on an interruption)."""
        if self._live is not None:
            self._live.stop()
            self._live = None

    # ------------------------------------------------------------------ drawing

    def _bar(self, value: int, total: int, width: int, style: str) -> Any:
        r = self._rich
        filled = 0 if total <= 0 else max(0, min(width, round(width * value / total)))
        text = r.text.Text("█" * filled, style=style)
        text.append("░" * (width - filled), style="grey30")
        return text

    def _render(self, f: Frame) -> Any:
        r = self._rich
        header = self._header
        assert header is not None
        s = f.stats
        title = r.text.Text.assemble(
            (f"phase {f.phase}/{header.phases}  ", "bold"),
            (f.phase_name.upper(), "bold cyan"),
            f"  {f.t:4.1f} s of ~{header.seconds:g} s",
        )
        what = r.text.Text(f.phase_text, style="italic")

        mem = r.table.Table(box=None, show_header=False, pad_edge=False)
        mem.add_column(width=19)
        mem.add_column(justify="right", width=9)
        mem.add_column(width=12)
        size = max(s.file_size, 1)
        usage = s.usage
        for label, value, style in (
            ("page cache (values)", usage.page_cache, "green"),
            ("anonymous (table)", usage.anonymous, "blue"),
            ("system (freed)", usage.system, "yellow"),
        ):
            mem.add_row(label, fmt_bytes(value), self._bar(value, size, 12, style))
        mem.add_row(
            "committed, all",
            fmt_bytes(s.committed_bytes),
            self._bar(s.committed_bytes, size, 12, "white"),
        )
        mem.add_row("file size", fmt_bytes(s.file_size), r.text.Text("(sparse)", style="dim"))
        if f.cgroup_usage is not None and f.cgroup_limit:
            mem.add_row(
                "cgroup, all memory",
                fmt_bytes(f.cgroup_usage),
                self._bar(f.cgroup_usage, f.cgroup_limit, 12, "red"),
            )
            mem.add_row("cgroup limit", fmt_bytes(f.cgroup_limit), "")

        ev = s.evictions
        fig = r.table.Table(box=None, show_header=False, pad_edge=False)
        fig.add_column(width=19)
        fig.add_column()
        fig.add_row(
            "cache values",
            f"{f.cache_entries:,} · {fmt_bytes(f.cache_bytes)} of {fmt_bytes(f.cache_budget)}",
        )
        fig.add_row("requests", f"{f.ops_per_s:,.0f}/s · {100 * f.hit_ratio:.0f}% hits")
        fig.add_row("reads verified", f"{f.verified:,} (CRC)")
        fig.add_row("replaced by LRU", f"{f.lru_dropped:,}")
        fig.add_row(
            "pressure",
            f"low {s.pressure_low} · medium {s.pressure_medium} · critical {s.pressure_critical}",
        )
        fig.add_row("evicted", f"{fmt_bytes(ev.evicted_bytes)} · {ev.evict_calls:,} calls")
        fig.add_row("released", f"{fmt_bytes(s.bytes_released)} · {s.releases:,} batches")
        fig.add_row("recycled", fmt_bytes(s.recycled_bytes))
        fig.add_row("to be released", fmt_bytes(s.release_backlog))

        left = r.panel.Panel(mem, title="memory file: committed bytes", title_align="left")
        right = r.panel.Panel(fig, title="cache · pressure · release", title_align="left")
        if self._console.width >= 100:
            cols: Any = r.table.Table.grid(padding=(0, 1))
            cols.add_column()
            cols.add_column()
            cols.add_row(left, right)
        else:
            cols = r.console.Group(left, right)
        events = r.text.Text()
        for i, (t, text) in enumerate(self._events):
            events.append(("\n" if i else "") + f"{t:5.1f} s  ", style="dim")
            events.append(text)
        cells = f.cells
        parts = [
            title,
            what,
            cols,
            r.panel.Panel(
                self._map(cells),
                title=f"file map · {fmt_bytes(cells.file_size)} · "
                f"one cell = {fmt_bytes(cells.cell_size)}",
                title_align="left",
                subtitle=self._legend(),
                subtitle_align="left",
            ),
        ]
        if self._console.height >= (36 if self._console.width >= 100 else 48):
            parts.append(
                r.panel.Panel(
                    events or r.text.Text("(none yet)", style="dim"),
                    title="events",
                    title_align="left",
                )
            )
        return r.console.Group(*parts)

    _CELL: ClassVar[dict[int, tuple[str, str]]] = {
        NEVER_USED: ("·", "grey23"),
        RELEASED: ("░", "grey50"),
        FREED: ("▒", "yellow"),
    }
    _LIVE_STYLE = ("magenta", "blue", "green", "cyan", "cyan", "cyan")

    def _map(self, cells: CellMap) -> Any:
        r = self._rich
        width = max(16, min(64, self._console.width - 6))
        text = r.text.Text()
        for i, state in enumerate(cells.states):
            if i and i % width == 0:
                text.append("\n")
            if state >= LIVE_BASE:
                text.append("█", style=self._LIVE_STYLE[(state - LIVE_BASE) % 6])
            else:
                ch, style = self._CELL.get(state, ("?", "red"))
                text.append(ch, style=style)
        return text

    def _legend(self) -> Any:
        t = self._rich.text.Text()
        for ch, style, name in (
            ("█", "green", " cache values "),
            ("█", "blue", " session table "),
            ("▒", "yellow", " freed, to release "),
            ("░", "grey50", " released "),
            ("·", "grey23", " never used"),
        ):
            t.append(ch, style=style)
            t.append(name)
        return t


class _RichModules:
    """The rich modules, imported when a RichView is made (rich is optional
    and the rest of the package never needs it)."""

    def __init__(self) -> None:
        self.console: Any = importlib.import_module("rich.console")
        self.live: Any = importlib.import_module("rich.live")
        self.panel: Any = importlib.import_module("rich.panel")
        self.table: Any = importlib.import_module("rich.table")
        self.text: Any = importlib.import_module("rich.text")
