"""Read a W&B offline run file (run-<id>.wandb) back, for tests.

wandb has no public offline reader. The file is a 7-byte header (":W&B" + version) followed by
LevelDB-log framing: 32 KiB blocks of records, each with a 7-byte header (crc32 u32, length u16,
type u8: 1 full, 2 first, 3 middle, 4 last) around serialized `wandb_internal_pb2.Record`s.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7


def records(path: str | Path):
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B run file"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0 and length == 0:
            pos += left
            continue
        payload = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == 1:
            chunk = payload
        elif kind == 2:
            pending = payload
            continue
        elif kind == 3:
            pending += payload
            continue
        elif kind == 4:
            chunk, pending = pending + payload, b""
        else:
            raise ValueError(f"{path}: bad record type {kind} at {pos}")
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(chunk)
        yield rec


def history(path: str | Path) -> list[dict]:
    """The logged history rows ({key: value}, with _step)."""
    rows = []
    for rec in records(path):
        if rec.WhichOneof("record_type") == "history":
            row = {}
            for item in rec.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            rows.append(row)
    return rows


def has_exit(path: str | Path) -> bool:
    return any(rec.WhichOneof("record_type") == "exit" for rec in records(path))
