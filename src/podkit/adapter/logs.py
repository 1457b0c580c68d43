"""Log lines in many formats -> one JSON schema (sans-IO: text in, records out).

Every record is a dict with the same keys:

    {"time": ISO 8601 or None, "level": "debug|info|warning|error|critical" or None,
     "message": str, "format": "json|combined|common|python|logfmt|raw",
     "parsed": bool, "fields": {...}}

- `json`: one JSON object per line; message from msg/message/event/log, time from
  time/timestamp/ts/@timestamp/asctime, level from level/levelname/severity/lvl; the
  other keys go to `fields`.
- `combined` / `common`: access logs (Apache, nginx); `fields` holds remote_addr, ident,
  user, method, path, protocol, status, bytes (and referer, user_agent); the level follows
  the status (5xx error, 4xx warning).
- `python`: the logging module's usual layouts (`LEVEL:logger:msg`,
  `2026-11-25 01:02:03,456 LEVEL logger: msg`, `... - logger - LEVEL - msg`, and
  `[time] LEVEL ...`); a traceback after a record joins that record (`fields.exc_info`).
- `logfmt`: `key=value key="quoted value"` pairs covering the whole line.
- A line none of these take is kept whole as `format: raw`, `parsed: false`: nothing is
  dropped.

`LogParser.feed(line)` returns the records completed so far; a Python record waits for
the next line (it may be followed by its traceback); `flush()` returns it.
"""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime
from typing import Any

Record = dict[str, Any]

LEVELS = {
    "trace": "debug", "debug": "debug", "dbg": "debug", "info": "info", "information": "info",
    "notice": "info", "warn": "warning", "warning": "warning", "error": "error", "err": "error",
    "critical": "critical", "crit": "critical", "fatal": "critical", "panic": "critical",
    "alert": "critical", "emerg": "critical", "emergency": "critical",
}  # fmt: skip
MESSAGE_KEYS = ("msg", "message", "event", "log")
TIME_KEYS = ("time", "timestamp", "ts", "@timestamp", "asctime", "t")
LEVEL_KEYS = ("level", "levelname", "severity", "lvl", "loglevel")

_ACCESS = re.compile(
    r'(?P<remote_addr>\S+) (?P<ident>\S+) (?P<user>\S+) \[(?P<time>[^\]]+)\] '
    r'"(?P<request>(?:[^"\\]|\\.)*)" (?P<status>\d{3}) (?P<bytes>\d+|-)'
    r'(?: "(?P<referer>(?:[^"\\]|\\.)*)" "(?P<user_agent>(?:[^"\\]|\\.)*)")?\s*'
)  # fmt: skip
_LEVEL_WORD = r"(?P<level>DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL|FATAL)"
_STAMP = (
    r"(?P<time>\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}(?:[.,]\d+)?(?: ?(?:Z|[+-]\d{2}:?\d{2}))?)"
)
_PYTHON = [
    re.compile(rf"{_LEVEL_WORD}:(?P<logger>[^:\s]*):(?P<message>.*)"),
    re.compile(rf"{_STAMP}\s+-\s+(?P<logger>\S+)\s+-\s+{_LEVEL_WORD}\s+-\s+(?P<message>.*)"),
    re.compile(rf"{_STAMP}\s+{_LEVEL_WORD}\s+(?:(?P<logger>[\w.\-]+):\s+)?(?P<message>.*)"),
    re.compile(rf"\[{_STAMP}\]\s+(?:\[\d+\]\s+)?\[?{_LEVEL_WORD}\]?\s+(?P<message>.*)"),
]
_LOGFMT_PAIR = re.compile(r'\s*([\w.\-/@]+)=("(?:[^"\\]|\\.)*"|[^\s"]*)(?=\s|$)')


def _iso(value: Any) -> str | None:
    """A time in any usual shape -> ISO 8601 (UTC when the input has no zone), or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        if not math.isfinite(value) or value <= 0:
            return None
        seconds = value / 1000 if value > 1e11 else value  # milliseconds since the epoch
        try:
            return datetime.fromtimestamp(seconds, UTC).isoformat()
        except (OverflowError, OSError, ValueError):
            return None
    if not isinstance(value, str) or not value:
        return None
    text = value.strip().replace(",", ".", 1) if "," in value[:30] else value.strip()
    text = re.sub(r"(\d) ([+-]\d{2}:?\d{2})$", r"\1\2", text)  # "01:02:03 +0000"
    for attempt in (text, text.replace("Z", "+00:00")):
        try:
            parsed = datetime.fromisoformat(attempt)
        except ValueError:
            continue
        return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).isoformat()
    try:
        return datetime.strptime(value.strip(), "%d/%b/%Y:%H:%M:%S %z").isoformat()
    except ValueError:
        return None


def _level(value: Any) -> str | None:
    if isinstance(value, str):
        return LEVELS.get(value.strip().lower())
    if isinstance(value, int) and not isinstance(value, bool):  # logging's numbers
        for bound, name in ((50, "critical"), (40, "error"), (30, "warning"), (20, "info")):
            if value >= bound:
                return name
        return "debug"
    return None


def _record(fmt: str, message: str, time: Any, level: Any, fields: dict[str, Any]) -> Record:
    return {
        "time": _iso(time),
        "level": _level(level),
        "message": message,
        "format": fmt,
        "parsed": True,
        "fields": fields,
    }


def raw(line: str) -> Record:
    """A line no parser takes, kept whole."""
    return {
        "time": None,
        "level": None,
        "message": line,
        "format": "raw",
        "parsed": False,
        "fields": {},
    }


def parse_json(line: str) -> Record | None:
    if not line.startswith("{"):
        return None
    try:
        data = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    fields = dict(data)

    def take(keys: tuple[str, ...]) -> Any:
        for k in keys:
            if k in fields:
                return fields.pop(k)
        return None

    message = take(MESSAGE_KEYS)
    time = take(TIME_KEYS)
    level = take(LEVEL_KEYS)
    if message is not None and not isinstance(message, str):
        message = json.dumps(message)
    rec = _record("json", message or "", time, level, fields)
    if time is not None and rec["time"] is None:
        fields["time"] = time  # kept as it came
    if level is not None and rec["level"] is None:
        fields["level"] = level
    return rec


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def parse_access(line: str) -> Record | None:
    m = _ACCESS.fullmatch(line)
    if m is None:
        return None
    g = m.groupdict()
    request = _unescape(g["request"])
    parts = request.split(" ")
    fields: dict[str, Any] = {
        "remote_addr": g["remote_addr"],
        "ident": None if g["ident"] == "-" else g["ident"],
        "user": None if g["user"] == "-" else g["user"],
    }
    if len(parts) == 3:
        fields.update(method=parts[0], path=parts[1], protocol=parts[2])
    else:
        fields["request"] = request  # e.g. "-" or garbage sent by a scanner
    status = int(g["status"])
    fields["status"] = status
    fields["bytes"] = None if g["bytes"] == "-" else int(g["bytes"])
    fmt = "common"
    if g["referer"] is not None:
        fmt = "combined"
        fields["referer"] = None if g["referer"] == "-" else _unescape(g["referer"])
        fields["user_agent"] = _unescape(g["user_agent"] or "")
    level = "error" if status >= 500 else "warning" if status >= 400 else "info"
    rec = _record(fmt, request, g["time"], level, fields)
    if rec["time"] is None:
        fields["time"] = g["time"]
    return rec


def parse_python(line: str) -> Record | None:
    for pattern in _PYTHON:
        m = pattern.fullmatch(line)
        if m is not None:
            g = m.groupdict()
            fields: dict[str, Any] = {}
            if g.get("logger"):
                fields["logger"] = g["logger"]
            return _record("python", g["message"].strip(), g.get("time"), g["level"], fields)
    return None


def parse_logfmt(line: str) -> Record | None:
    pos = 0
    pairs: dict[str, str] = {}
    text = line.rstrip()
    while pos < len(text):
        m = _LOGFMT_PAIR.match(text, pos)
        if m is None or m.end() == pos:
            return None
        key, value = m.group(1), m.group(2)
        if value.startswith('"'):
            try:
                value = json.loads(value)
            except ValueError:
                value = _unescape(value[1:-1])
        pairs[key] = value
        pos = m.end()
    known = {*MESSAGE_KEYS, *LEVEL_KEYS, *TIME_KEYS}
    if len(pairs) < 2 and not known & set(pairs):
        return None
    fields: dict[str, Any] = dict(pairs)

    def take(keys: tuple[str, ...]) -> Any:
        for k in keys:
            if k in fields:
                return fields.pop(k)
        return None

    message, time, level = take(MESSAGE_KEYS), take(TIME_KEYS), take(LEVEL_KEYS)
    rec = _record("logfmt", message or "", time, level, fields)
    if time is not None and rec["time"] is None:
        fields["time"] = time
    if level is not None and rec["level"] is None:
        fields["level"] = level
    return rec


def parse_line(line: str) -> Record:
    """One line (no newline) -> a record; never raises, never drops the text."""
    line = line.rstrip("\r\n")
    for parser in (parse_json, parse_access, parse_python, parse_logfmt):
        try:
            rec = parser(line)
        except (ValueError, OverflowError, RecursionError):
            rec = None
        if rec is not None:
            return rec
    return raw(line)


def _continues(line: str) -> bool:
    """A traceback line or an indented continuation of the record before."""
    return bool(line) and (
        line[0] in " \t"
        or line.startswith("Traceback (most recent call last):")
        or line.startswith("During handling of the above exception")
        or line.startswith("The above exception was the direct cause")
    )


class LogParser:
    """Stateful line parser that attaches tracebacks to the Python record before them."""

    def __init__(self) -> None:
        self._held: Record | None = None
        self._in_traceback = False

    def feed(self, line: str) -> list[Record]:
        """Parse one line; return the records that are complete."""
        line = line.rstrip("\r\n")
        held = self._held
        if held is None:
            rec = parse_line(line)
            if rec["format"] != "python":
                return [rec]
            self._held = rec
            return []
        in_tb = self._in_traceback
        if _continues(line) or (in_tb and (not line.strip() or _exception_line(line))):
            exc = held["fields"].get("exc_info")
            held["fields"]["exc_info"] = line if exc is None else f"{exc}\n{line}"
            self._in_traceback = in_tb or line.startswith("Traceback")
            return []
        return [*self.flush(), *self.feed(line)]

    def flush(self) -> list[Record]:
        """The record still held (waiting for a possible traceback), if any."""
        held, self._held = self._held, None
        self._in_traceback = False
        return [] if held is None else [held]


def _exception_line(line: str) -> bool:
    """`ValueError: bad` or `mod.Error` ending a traceback."""
    return bool(re.match(r"[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Warning)\b", line))
