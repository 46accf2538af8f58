"""TensorBoard event files read back (TFRecord framing, tensorboardX's protos): what a
trial's files hold, for tests."""

from __future__ import annotations

import struct
from pathlib import Path


def read_events(folder: Path) -> tuple[dict[str, list[tuple[int, float]]], dict[str, object]]:
    """Every ``events.out.tfevents.*`` in ``folder``: scalars by tag as ``(step, value)`` in
    file order, and the HParams view's hyperparameters (``{}`` when none were logged)."""
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData

    scalars: dict[str, list[tuple[int, float]]] = {}
    hparams: dict[str, object] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at : at + 8])
            record = data[at + 12 : at + 12 + length]  # after the length and its CRC
            at += 12 + length + 4  # the record and its CRC
            event = Event.FromString(record)
            for value in event.summary.value:
                if value.tag == "_hparams_/session_start_info":
                    info = HParamsPluginData.FromString(value.metadata.plugin_data.content)
                    for key, v in info.session_start_info.hparams.items():
                        hparams[key] = (
                            v.number_value if v.HasField("number_value") else (v.string_value)
                        )
                elif value.HasField("simple_value"):
                    scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars, hparams
