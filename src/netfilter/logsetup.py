"""How `netfilter` logs: text lines for people (the default), or one JSON object per
line for log collectors (`--log-format json`, or NETFILTER_LOG_FORMAT=json).

The format travels to the mitmdump child in the environment, so one setting covers
every process that `netfilter serve` starts. The records carry what the messages
say and no more: the messages themselves keep client addresses out.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import UTC, datetime
from typing import Literal

__all__ = ["ENV", "FORMATS", "JsonFormatter", "LogFormat", "chosen_format", "setup"]

ENV = "NETFILTER_LOG_FORMAT"
FORMATS = ("text", "json")
LogFormat = Literal["text", "json"]
TEXT = "netfilter: %(levelname)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:  # a traceback stays inside its one line
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def chosen_format(given: str | None = None) -> LogFormat:
    """`given` (the command line) first, then NETFILTER_LOG_FORMAT; text otherwise."""
    value = (given or os.environ.get(ENV) or "text").strip().lower()
    return "json" if value == "json" else "text"


def setup(level: int, fmt: LogFormat = "text") -> None:
    """Configure the root logger once, and export the format for child processes."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT))
    logging.basicConfig(level=level, handlers=[handler])
    os.environ[ENV] = fmt
