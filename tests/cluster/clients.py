"""What the cluster tests drive gateways with: their HTTP API, a paho
device subscribed to its commands, and a bounded poll of a real answer."""
from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import paho.mqtt.client as paho

__all__ = ["Device", "request", "until"]

T = TypeVar("T")


def request(addr: tuple[str, int], method: str, path: str, body: dict | None = None,
            timeout: float = 10.0) -> tuple[int, dict]:
    """One HTTP request on a connection of its own: status and JSON body ({} when empty)."""
    conn = http.client.HTTPConnection(*addr, timeout=timeout)
    data = None if body is None else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={} if data is None else {"Content-Type": "application/json"})
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    return resp.status, json.loads(payload) if payload else {}


def until(check: Callable[[], T], timeout: float = 15.0, what: str = "condition", interval: float = 0.05) -> T:
    """Poll ``check`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s (last: {result!r})")
        time.sleep(interval)


class Device:
    """A paho MQTT device at ``addr`` subscribed to its command topic."""

    def __init__(self, addr: tuple[str, int], device_id: str, subscribe_timeout: float = 10.0) -> None:
        self.id = device_id
        self.commands: list[dict] = []
        self.disconnected = threading.Event()
        subscribed = threading.Event()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=device_id)
        self.client.on_message = lambda c, u, msg: self.commands.append(json.loads(msg.payload))
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_disconnect = lambda *a: self.disconnected.set()
        self.client.reconnect_delay_set(60, 60)       # a takeover must not be undone by a reconnect
        self.client.connect(*addr, keepalive=30)
        self.client.loop_start()
        self.client.subscribe(f"devices/{device_id}/commands", qos=1)
        assert subscribed.wait(subscribe_timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
