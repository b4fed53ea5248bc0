"""The MQTT transport's counters, read at each /metrics scrape."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class MqttStats:
    requests: int = 0
    replies: int = 0
    errors: int = 0
    busy: int = 0
    duplicates: int = 0
    ignored: int = 0  # bad device names, topics we do not serve
    commands: int = 0  # published (rejected ones are counted by the sessions' metrics)
    deltas_dropped: int = 0
    outbox_dropped: int = 0
    connections: int = 0
    status_restored: int = 0  # share group: `online` published again after a replica left
    conversations_loaded: int = 0  # from the store: after a restart, or newer than ours
