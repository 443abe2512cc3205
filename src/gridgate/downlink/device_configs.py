"""Per-device configs pushed as UPDATE_CONFIG when a device connects.

Two sources: ``[devices."<id>"]`` tables in the gateway config, and
``[downlink] devices_file`` - a TOML or JSON table ``{device id: config}``
(JSON when the name ends in ``.json``, TOML otherwise). Both are checked at
``Config.load`` with every problem reported at once; the gateway reads them
once at start.
"""
from __future__ import annotations

import json
import os
import tomllib
from typing import Any

from gridgate.downlink.wire import UPDATE_CONFIG, encode_command, new_command
from gridgate.ingest.records import DEVICE_ID_RE

__all__ = ["load_device_configs", "device_config_problems", "MAX_DEVICES_FILE_BYTES"]

# A devices file is read whole into memory: keep it to a size that is sane.
MAX_DEVICES_FILE_BYTES = 64 * 1024 * 1024


def _check(source: str, configs: Any, max_command_bytes: int, out: dict[str, dict[str, Any]],
           problems: list[str]) -> None:
    if not isinstance(configs, dict):
        problems.append(f"{source}: must be a table of device id -> config table")
        return
    for device_id, config in configs.items():
        where = f"{source}.{device_id}" if source == "devices" else f"{source}: device {device_id!r}"
        if not isinstance(device_id, str) or not DEVICE_ID_RE.match(device_id):
            problems.append(f"{where}: not a valid device id ([A-Za-z0-9][A-Za-z0-9._:-]{{0,127}})")
            continue
        if not isinstance(config, dict):
            problems.append(f"{where}: the config must be a table, not {type(config).__name__}")
            continue
        size = len(encode_command(new_command(UPDATE_CONFIG, config)))
        if size > max_command_bytes:
            problems.append(f"{where}: UPDATE_CONFIG of {size} bytes exceeds downlink.max_command_bytes "
                            f"{max_command_bytes}")
            continue
        out[device_id] = config


def _read_file(path: str, problems: list[str]) -> Any:
    try:
        size = os.path.getsize(path)
        if size > MAX_DEVICES_FILE_BYTES:
            problems.append(f"downlink.devices_file {path!r}: {size} bytes, more than {MAX_DEVICES_FILE_BYTES}")
            return None
        with open(path, "rb") as f:
            data = f.read()
        if path.endswith(".json"):
            return json.loads(data)
        return tomllib.loads(data.decode("utf-8"))
    except FileNotFoundError:
        problems.append(f"downlink.devices_file {path!r} does not exist")
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError, TOMLDecodeError are ValueErrors
        problems.append(f"downlink.devices_file {path!r}: {exc}")
    return None


def load_device_configs(inline: dict[str, Any], devices_file: str,
                        max_command_bytes: int) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Merge ``[devices.*]`` and the devices file; return (configs, problems).

    A device configured in both places is a problem (which one was meant?).
    """
    problems: list[str] = []
    out: dict[str, dict[str, Any]] = {}
    _check("devices", inline, max_command_bytes, out, problems)
    if devices_file:
        from_file = _read_file(devices_file, problems)
        if from_file is not None:
            file_configs: dict[str, dict[str, Any]] = {}
            _check(f"downlink.devices_file {devices_file!r}", from_file, max_command_bytes, file_configs, problems)
            for device_id in sorted(file_configs.keys() & out.keys()):
                problems.append(f"device {device_id!r} is configured both in [devices] and in {devices_file!r}")
            for device_id, config in file_configs.items():
                out.setdefault(device_id, config)
    return out, problems


def device_config_problems(inline: dict[str, Any], devices_file: str, max_command_bytes: int) -> list[str]:
    return load_device_configs(inline, devices_file, max_command_bytes)[1]
