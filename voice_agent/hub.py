"""What transports share besides the engine: the command bus and the devices file.

CommandBus joins the WebSocket side and the MQTT side of one process:

    bus.publish(device, command)    a WebSocket session of `device` extracted a
                                    command: hand it to the MQTT transport (if
                                    one is attached), which publishes it on
                                    PREFIX/DEVICE/command
    bus.deliver(device, command)    the MQTT transport extracted a command for
                                    `device`: hand it to every WebSocket session
                                    of that device (they send a `command` event)
    bus.subscribe(device, callback) a WebSocket session registers; returns the
                                    function that unregisters it

Commands never loop: publish only reaches the MQTT sink, deliver only reaches
subscribers. A failing callback is logged and does not stop the others.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from voice_agent.commands import Command, DeviceList, parse_devices, valid_device_name
from voice_agent.errors import ConfigError

logger = logging.getLogger("voice_agent.hub")

CommandCallback = Callable[[Command], Awaitable[None]]
CommandSink = Callable[[str, Command], Awaitable[None]]


class CommandBus:
    def __init__(self) -> None:
        self._subscribers: dict[str, list[CommandCallback]] = {}
        self._sink: CommandSink | None = None
        self.published = 0
        self.delivered = 0

    def attach(self, sink: CommandSink | None) -> None:
        """The MQTT transport registers its publisher here (None detaches it)."""
        self._sink = sink

    @property
    def attached(self) -> bool:
        return self._sink is not None

    async def publish(self, device: str, command: Command) -> None:
        """From a WebSocket session of `device`: to MQTT, when attached."""
        sink = self._sink
        if sink is None or not valid_device_name(device):
            return
        self.published += 1
        try:
            await sink(device, command)
        except Exception:
            logger.exception("command sink failed", extra={"device": device})

    def subscribe(self, device: str, callback: CommandCallback) -> Callable[[], None]:
        """Receive MQTT-originated commands for `device`; returns `unsubscribe`."""
        self._subscribers.setdefault(device, []).append(callback)

        def unsubscribe() -> None:
            callbacks = self._subscribers.get(device)
            if callbacks and callback in callbacks:
                callbacks.remove(callback)
                if not callbacks:
                    del self._subscribers[device]

        return unsubscribe

    def subscribers(self, device: str) -> int:
        return len(self._subscribers.get(device, ()))

    async def deliver(self, device: str, command: Command) -> None:
        """From MQTT: to every WebSocket session of `device`."""
        for callback in list(self._subscribers.get(device, ())):
            self.delivered += 1
            try:
                await callback(command)
            except Exception:
                logger.exception("command subscriber failed", extra={"device": device})


@functools.lru_cache(maxsize=8)
def _load(path: str, mtime_ns: int) -> DeviceList:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read devices file {path}: {exc.__class__.__name__}") from None
    return parse_devices(text)


def load_devices(path: str | None) -> DeviceList | None:
    """The devices file (`--devices`), parsed once per path and modification time."""
    if not path:
        return None
    try:
        mtime = Path(path).stat().st_mtime_ns
    except OSError:
        raise ConfigError(f"devices file not found: {path}") from None
    return _load(path, mtime)
