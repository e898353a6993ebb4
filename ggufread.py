"""A GGUF file's metadata and tensors in one pass over a memory map (formats.py's GGUF reader).

gguf's own GGUFReader makes a numpy memmap view for every element of every array, which is ~3 s for a 49k-token
vocabulary; this reads the same fields with struct and hands out the tensors as plain ndarrays over the map, in
GGUFReader's layout (the test compares the two on every file it can make). The format (little-endian, v2 / v3):

  "GGUF" | version u32 | tensor count u64 | kv count u64
  kv:     key (string) | value type u32 | value         string: length u64, utf-8 bytes
                                                        array:  element type u32, count u64, elements
  tensor: name (string) | n_dims u32 | dims u64 x n_dims (fastest first) | ggml type u32 | offset u64
  padding to general.alignment (32), then the tensors' data, each at its offset
"""
import mmap
import struct
from typing import NamedTuple

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quant_shape_to_byte_shape

# GGUF's value types (gguf.GGUFValueType): 0-7 and 10-12 are fixed-size scalars, 8 a string, 9 an array
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9
# tensor types whose data GGUFReader hands out as values (every other type: the raw bytes, uint8)
VALUES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I8": np.int8, "I16": np.int16, "I32": np.int32,
          "I64": np.int64}


class Tensor(NamedTuple):
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple  # dims, fastest first (GGUF's order)
    data: np.ndarray  # [dims reversed] values, or [.., bytes per row] for block types


class GGUFFile(NamedTuple):
    meta: dict  # key -> Python value (lists for arrays), as GGUFReader's field.contents()
    tensors: list


class _Cursor:
    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def take(self, fmt):
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return v

    def string(self):
        n = self.take("<Q")
        self.pos += n
        if self.pos > len(self.buf):
            raise ValueError("a string runs past the end of the file")
        return str(self.buf[self.pos - n : self.pos], "utf-8")

    def value(self, kind):
        if kind == STRING:
            return self.string()
        if kind == ARRAY:
            sub, n = self.take("<I"), self.take("<Q")
            if sub in SCALARS:  # numbers and bools: one numpy read of the whole array
                dt = np.dtype(SCALARS[sub])
                a = np.frombuffer(self.buf, dt, n, self.pos)
                self.pos += n * dt.itemsize
                return a.tolist()
            return [self.value(sub) for _ in range(n)]
        if kind not in SCALARS:
            raise ValueError(f"unknown value type {kind}")
        return self.take(SCALARS[kind])


def read(path: str) -> GGUFFile:
    """The file's metadata and tensors (the tensors' data stays in the map until it is read). Raises ValueError
    (or struct.error) on a file that is not GGUF v2 / v3 or is cut short."""
    with open(path, "rb") as f:
        buf = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
    c = _Cursor(buf)
    if bytes(buf[:4]) != b"GGUF":
        raise ValueError("GGUF magic invalid")
    c.pos = 4
    version = c.take("<I")
    if version not in (2, 3):
        raise ValueError(f"version {version} is not GGUF v2 or v3 (or the file is big-endian)")
    n_tensors, n_kv = c.take("<Q"), c.take("<Q")
    meta = {"GGUF.version": version, "GGUF.tensor_count": n_tensors, "GGUF.kv_count": n_kv}
    for _ in range(n_kv):
        key = c.string()
        if key in meta:
            raise ValueError(f"the key {key} is written twice")
        meta[key] = c.value(c.take("<I"))
    infos, seen = [], set()
    for _ in range(n_tensors):
        name = c.string()
        if name in seen:
            raise ValueError(f"the tensor {name} is written twice")
        seen.add(name)
        dims = tuple(c.take("<Q") for _ in range(c.take("<I")))
        infos.append((name, dims, GGMLQuantizationType(c.take("<I")), c.take("<Q")))
    align = meta.get("general.alignment", 32)
    start = -(-c.pos // align) * align
    data, tensors = np.frombuffer(buf, np.uint8), []
    for name, dims, kind, offset in infos:
        block, size = GGML_QUANT_SIZES[kind]
        n = int(np.prod(dims, dtype=np.int64))
        lo, hi = start + offset, start + offset + n * size // block
        if hi > len(buf):
            raise ValueError(f"tensor {name} runs past the end of the file")
        shape = tuple(reversed(dims))
        if kind.name in VALUES:
            a = data[lo:hi].view(VALUES[kind.name]).reshape(shape)
        else:
            a = data[lo:hi].reshape(quant_shape_to_byte_shape(shape, kind))
        tensors.append(Tensor(name, kind, dims, a))
    return GGUFFile(meta, tensors)
