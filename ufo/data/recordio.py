"""InsightFace's face packs, read without mxnet: MXNet RecordIO (`train.rec` + `train.idx`) and the
verification sets (`lfw.bin`, `cfp_fp.bin`, `agedb_30.bin`).

RecordIO: a file of records, each `uint32 magic (0xced7230a)`, `uint32 lrecord` (upper 3 bits a
continuation flag, lower 29 bits the length), the payload, zero padding to a multiple of 4.
`train.idx` has a line `index<TAB>offset` per record. An image record's payload (mxnet's
`recordio.pack`) starts with the header `IfQQ` (flag, label, id, id2; little-endian, 24 bytes);
when flag > 0 the label is instead `flag` float32s after the header; the encoded image follows.
InsightFace's record 0 is a header whose labels give the range of image records, [1, label[0]).
`property` holds `num_classes,height,width`.

A verification set is a pickle of (list of encoded images, list of is-same flags), two images a
pair. It is read by an unpickler that builds bytes, lists, tuples and bools only and refuses any
other object: a pickle naming a class or function (that could run code) is refused (but
`_codecs.encode`, how Python 3 writes bytes at pickle protocol 2).
"""

from __future__ import annotations

import io
import pickle
import struct
from pathlib import Path
from typing import Iterator

from ufo.errors import DataError

MAGIC = 0xCED7230A
HEADER = struct.Struct("<IfQQ")


def read_index(idx: Path) -> dict[int, int]:
    """Record index -> byte offset, from a `.idx` file."""
    offsets = {}
    for n, line in enumerate(idx.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit() or not parts[1].isdigit():
            raise DataError(f"{idx}: line {n} is not `index<TAB>offset`")
        offsets[int(parts[0])] = int(parts[1])
    return offsets


def read_record(f, offset: int, where: Path) -> bytes:
    """The payload of the record at `offset` (continued records joined)."""
    f.seek(offset)
    parts = []
    while True:
        head = f.read(8)
        if len(head) < 8:
            raise DataError(f"{where}: record at byte {offset} is cut short")
        magic, lrecord = struct.unpack("<II", head)
        if magic != MAGIC:
            raise DataError(f"{where}: no RecordIO record at byte {offset} (magic {magic:#x})")
        flag, length = lrecord >> 29, lrecord & ((1 << 29) - 1)
        data = f.read(length)
        if len(data) < length:
            raise DataError(f"{where}: record at byte {offset} is cut short")
        f.read((4 - length % 4) % 4)
        parts.append(data)
        if flag in (0, 3):  # whole, or the last part of a continued record
            return b"".join(parts)


def unpack(payload: bytes) -> tuple[list[float], bytes]:
    """(labels, encoded image) of an image record's payload."""
    flag, label, _, _ = HEADER.unpack_from(payload)
    rest = payload[HEADER.size:]
    if flag > 0:
        labels = list(struct.unpack_from(f"<{flag}f", rest))
        return labels, rest[4 * flag:]
    return [label], rest


def pack(labels: list[float], image: bytes, id_: int = 0) -> bytes:
    """An image record's payload as mxnet's `recordio.pack` makes it (for tests and tools)."""
    if len(labels) == 1:
        return HEADER.pack(0, labels[0], id_, 0) + image
    return HEADER.pack(len(labels), 0.0, id_, 0) + struct.pack(f"<{len(labels)}f", *labels) + image


def write_record(f, payload: bytes) -> int:
    """Append one whole record; returns its offset."""
    offset = f.tell()
    f.write(struct.pack("<II", MAGIC, len(payload)))
    f.write(payload)
    f.write(b"\0" * ((4 - len(payload) % 4) % 4))
    return offset


def face_pack(rec: Path, idx: Path) -> Iterator[tuple[int, int, bytes]]:
    """(record index, identity, encoded image) of every image of an InsightFace training pack."""
    offsets = read_index(idx)
    if not offsets:
        raise DataError(f"{idx}: lists no record")
    with open(rec, "rb") as f:
        head = read_record(f, offsets[min(offsets)], rec)
        first, _ = unpack(head)
        header_record = min(offsets) == 0 and HEADER.unpack_from(head)[0] > 0
        keys = range(1, int(first[0])) if header_record else sorted(offsets)
        for key in keys:
            if key not in offsets:
                raise DataError(f"{idx}: has no record {key} (its header record promises {int(first[0]) - 1})")
            labels, image = unpack(read_record(f, offsets[key], rec))
            yield key, int(labels[0]), image


class _PlainUnpickler(pickle.Unpickler):
    """Builds bytes, str, numbers, lists, tuples, dicts and bools; refuses every class and function but
    `_codecs.encode`, with which Python 3 writes bytes into a protocol-2 pickle (it makes bytes of a str)."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("_codecs", "encode"):
            import codecs

            return codecs.encode
        raise pickle.UnpicklingError(f"refused: the pickle names {module}.{name}")


def verification_pairs(file: Path) -> tuple[list[bytes], list[bool]]:
    """(encoded images, is-same flags) of an InsightFace verification `.bin`, without running its code."""
    try:
        data = _PlainUnpickler(io.BytesIO(file.read_bytes()), encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise DataError(f"{file}: {e} (a verification set holds images and flags only; nothing else is "
                        "unpickled)") from None
    except (EOFError, ValueError, TypeError, IndexError) as e:
        raise DataError(f"{file}: not a verification set ({type(e).__name__})") from None
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise DataError(f"{file}: not a verification set (a pair of image list and is-same list)")
    images, same = data
    if not all(isinstance(b, (bytes, bytearray)) for b in images) or not all(isinstance(s, bool) for s in same):
        raise DataError(f"{file}: not a verification set (images must be bytes, flags bools)")
    if len(images) != 2 * len(same):
        raise DataError(f"{file}: {len(images)} images for {len(same)} pairs (two per pair)")
    return [bytes(b) for b in images], list(same)
