"""The one dtype table of checkpoint bytes: each element type by its torch name, its safetensors code,
its size in bytes and how one element is decoded without torch. The safetensors writer and reader
(safetensors_file.py), the manifest's structural checks (manifest.py) and the torch.save reader
(torchzip/) all derive their views from it, so a dtype is added in one place."""

from __future__ import annotations

from typing import NamedTuple, Optional


class DType(NamedTuple):
    torch: Optional[str]  # torch's name (torch.<name>), None where torch has none
    code: Optional[str]  # safetensors' code, None where safetensors has none
    itemsize: Optional[int]  # bytes per element; None for sub-byte shells (no reliable size)
    fmt: Optional[str] = None  # struct format of one element, or a decoder name ("bf16", "c8"...); None: not decoded
    written: bool = False  # our safetensors writer stores tensors of this type


TABLE: tuple[DType, ...] = (
    DType("float64", "F64", 8, "d", True), DType("float32", "F32", 4, "f", True),
    DType("float16", "F16", 2, "e", True), DType("bfloat16", "BF16", 2, "bf16", True),
    DType("int64", "I64", 8, "q", True), DType("int32", "I32", 4, "i", True), DType("int16", "I16", 2, "h", True),
    DType("int8", "I8", 1, "b", True), DType("uint8", "U8", 1, "B", True), DType("bool", "BOOL", 1, "?", True),
    DType("uint64", "U64", 8, "Q", True), DType("uint32", "U32", 4, "I", True), DType("uint16", "U16", 2, "H", True),
    DType("float8_e4m3fn", "F8_E4M3", 1, None, True), DType("float8_e5m2", "F8_E5M2", 1, None, True),
    DType("float8_e8m0fnu", "F8_E8M0", 1), DType("float4_e2m1fn_x2", "F4", 1),
    DType(None, "F6_E2M3", 1), DType(None, "F6_E3M2", 1),
    DType("complex128", None, 16, "c16"), DType("complex64", "C64", 8, "c8"), DType("complex32", None, 4, "c4"),
    DType("qint8", None, 1), DType("quint8", None, 1), DType("qint32", None, 4), DType("quint4x2", None, 1),
    DType("quint2x4", None, 1), DType("float8_e4m3fnuz", None, 1), DType("float8_e5m2fnuz", None, 1),
    DType("bits8", None, 1), DType("bits16", None, 2), DType("bits1x8", None, 1), DType("bits2x4", None, 1),
    DType("bits4x2", None, 1),
    *(DType(f"{sign}int{i}", None, None) for sign in ("", "u") for i in range(1, 8)),
)

BY_CODE: dict[str, DType] = {d.code: d for d in TABLE if d.code}
BY_TORCH_NAME: dict[str, DType] = {d.torch: d for d in TABLE if d.torch}
ITEMSIZE: dict[str, int] = {d.code: d.itemsize for d in TABLE if d.code and d.itemsize}  # safetensors code -> bytes
WRITTEN: tuple[DType, ...] = tuple(d for d in TABLE if d.written)
# Precisions as config.yaml names them (trainer.precision, consolidation.dtype) -> torch name
PRECISIONS: dict[str, str] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
