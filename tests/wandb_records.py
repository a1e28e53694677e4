"""The history rows of an offline wandb run, read from its `.wandb` file.

wandb >= 0.2x writes runs from its Go core and no longer ships a Python reader of them; the file
is LevelDB's log format (32 KiB blocks of [crc32c:4][length:2][type:1][data] chunks, type 1 =
a whole record, 2/3/4 = first/middle/last piece) after a 7-byte header (":W&B", a 2-byte key, a
version byte), and each record is wandb's own protobuf `Record` (parsed with wandb.proto)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _records(raw: bytes) -> list[bytes]:
    out, pending, pos = [], b"", HEADER
    while pos + 7 <= len(raw):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < 7:  # a block's tail too short for a chunk header is padding
            pos += left_in_block
            continue
        length, kind = struct.unpack_from("<HB", raw, pos + 4)
        data = raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            out.append(data)
        elif kind in (FIRST, MIDDLE):
            pending += data
        elif kind == LAST:
            out.append(pending + data)
            pending = b""
        else:  # zero padding at the file's end
            break
    return out


def history(run_dir: Path) -> list[dict]:
    """Every logged row ({key: value}) of the one offline run under `run_dir`/wandb, in order."""
    from wandb.proto import wandb_internal_pb2

    (path,) = (run_dir / "wandb").glob("offline-run-*/*.wandb")
    raw = path.read_bytes()
    assert raw[:4] == b":W&B", f"{path} is not a wandb run file"
    rows = []
    for data in _records(raw):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item})
    return rows
