"""Event.to_json: the line the audit log hashes, so its bytes must never drift."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import get_args

from hypothesis import given, settings
from hypothesis import strategies as st

from netfilter.events import Event, EventType

TIME = "2025-03-04T13:45:07.123+00:00"
_text = st.none() | st.text(max_size=20)


def _reference(event: Event, time: str) -> str:
    """What to_json wrote when it was built on `dataclasses.asdict`."""
    data = {k: v for k, v in asdict(event).items() if v is not None} | {"time": time}
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@settings(max_examples=300, deadline=None)
@given(st.builds(Event, type=st.sampled_from(get_args(EventType)), node=st.text(max_size=20),
                 time=st.just(TIME), frontend=_text, list=_text,
                 version=st.none() | st.integers(-(2**63), 2**63), ref=_text,
                 category=_text, action=_text, client=_text, detail=_text, target=_text))
def test_to_json_is_what_asdict_gave(event: Event) -> None:
    assert event.to_json() == _reference(event, TIME)


def test_to_json_fills_an_empty_time_and_keeps_unicode() -> None:
    event = Event("block", "n\u00f6de", ref="R-\u2603", version=0, detail="")
    before = datetime.now(UTC)
    line = event.to_json()
    time = json.loads(line)["time"]
    assert before - timedelta(seconds=1) <= datetime.fromisoformat(time) <= datetime.now(UTC)
    assert line == _reference(event, time)
    assert "\u2603" in line and '"version":0' in line and '"detail":""' in line
    assert "frontend" not in line  # None fields are left out
