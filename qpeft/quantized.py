"""``Quantized4bitWeight``: a 4-bit weight (packed codes + scales) and its bitsandbytes state-dict form.

State-dict keys for ``prefix="weight"`` (exactly bitsandbytes' Linear4bit keys):

    weight                                   uint8 (or quant_storage) [(n + 1) // (2 * itemsize), 1]
    weight.absmax                            fp32 [nblocks], or uint8 [nblocks] when double-quantized
    weight.quant_map                         fp32 [16], the code book
    weight.nested_absmax                     fp32 [ceil(nblocks / 256)]   (double quant only)
    weight.nested_quant_map                  fp32 [256]                   (double quant only)
    weight.quant_state.bitsandbytes__nf4     uint8 [len], UTF-8 JSON: quant_type, blocksize, dtype, shape
                                             (+ nested_blocksize, nested_dtype, nested_offset)
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping

import torch

from . import functional as F
from .errors import ConfigError
from .formats import NESTED_BLOCKSIZE, QUANT_TYPES, VALID_BLOCKSIZES, WEIGHT_FIELDS, code_book

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_DTYPES_BY_NAME = {name: dtype for dtype, name in _DTYPE_NAMES.items()}


def _pack_json(meta: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)


_MAX_QUANT_STATE_BYTES = 1 << 16  # bitsandbytes' quant_state JSON is ~150 bytes


# Field -> its bitsandbytes state-dict entry after "<prefix>." (the packed codes are "<prefix>" itself; the nested
# offset lives in the quant state's JSON).
STATE_DICT_ENTRIES = {f.name: f.entry for f in WEIGHT_FIELDS if f.entry}


def read_quant_state(t: torch.Tensor) -> dict:
    """The JSON object of a ``<weight>.quant_state.bitsandbytes__<type>`` entry."""
    if t.dtype != torch.uint8 or t.dim() != 1 or t.numel() > _MAX_QUANT_STATE_BYTES:
        raise ConfigError(
            "4-bit state dict",
            "quant_state",
            f"must be a 1-D uint8 tensor of at most {_MAX_QUANT_STATE_BYTES} bytes, got {t.dtype} {list(t.shape)}",
        )
    try:
        return json.loads(bytes(t.cpu().tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ConfigError("4-bit state dict", "quant_state", f"is not valid JSON ({type(e).__name__})") from None


@dataclasses.dataclass
class Quantized4bitWeight:
    """A blockwise 4-bit (NF4/FP4) tensor of ``shape``, optionally with double-quantized scales.

    ``packed`` holds the codes (bytes: element 2j in the high nibble of byte j), shaped ``[bytes / itemsize, 1]``
    in ``quant_storage`` dtype as bitsandbytes stores it. ``absmax`` is fp32 [nblocks], or uint8 codes of the
    scales when ``nested_absmax`` / ``nested_code`` / ``nested_offset`` are set (double quantization: the scales
    minus their mean, 8-bit quantized in blocks of 256). ``dtype`` is the dtype the weight had (and is restored
    to by default).
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    nested_offset: torch.Tensor | None = None  # fp32, one element

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_float(
        cls,
        W: torch.Tensor,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        quant_storage: torch.dtype = torch.uint8,
    ) -> "Quantized4bitWeight":
        """Quantize ``W`` (fp32/fp16/bf16, on CPU or CUDA) byte-identically to bitsandbytes' quantize_4bit."""
        packed, absmax = F.quantize_4bit(W, blocksize, quant_type)
        nested_absmax = nested_code = nested_offset = None
        if double_quant:
            nested_offset = absmax.mean()  # the same torch reduction bitsandbytes uses: same bits, same device
            nested_code = F.dynamic_map_8bit(W.device).clone()
            absmax, nested_absmax = F.quantize_blockwise_8bit(absmax - nested_offset, nested_code, NESTED_BLOCKSIZE)
        return cls(
            _as_storage(packed, quant_storage),
            absmax,
            torch.Size(W.shape),
            W.dtype,
            blocksize,
            quant_type,
            nested_absmax,
            nested_code,
            nested_offset,
        )

    def quantize_alike(self, W: torch.Tensor) -> "Quantized4bitWeight":
        """``W`` quantized in this weight's format (quant type, blocksize, double quantization, quant storage)."""
        return Quantized4bitWeight.from_float(W, self.quant_type, self.blocksize, self.double_quant, self.quant_storage)

    # ---- properties ---------------------------------------------------------------------------------------
    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def quant_storage(self) -> torch.dtype:
        return self.packed.dtype

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors of this weight by field name (absent ones left out)."""
        return {f.name: getattr(self, f.name) for f in WEIGHT_FIELDS if getattr(self, f.name) is not None}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    # ---- compute ------------------------------------------------------------------------------------------
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as a dense tensor of ``shape`` (in ``dtype``, default the original dtype)."""
        return F.dequantize_4bit(
            self.packed,
            self.absmax,
            self.blocksize,
            self.quant_type,
            self.shape,
            dtype or self.dtype,
            nested_absmax=self.nested_absmax,
            nested_code=self.nested_code,
            nested_offset=self.nested_offset,
        )

    def fp32_scales(self) -> torch.Tensor:
        """The per-block fp32 scales (decoding the double quantization if present)."""
        if not self.double_quant:
            return self.absmax
        return F.dequantize_blockwise_8bit(self.absmax, self.nested_absmax, self.nested_code) + self.nested_offset

    def to(self, device: torch.device | str) -> "Quantized4bitWeight":
        return dataclasses.replace(self, **{k: v.to(device) for k, v in self.tensors().items()})

    # ---- bitsandbytes state dict --------------------------------------------------------------------------
    def state_dict(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        """This weight under bitsandbytes' keys (see the module docstring); tensors are not copied."""
        meta = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": _DTYPE_NAMES[self.dtype],
            "shape": list(self.shape),
        }
        entry = {field: f"{prefix}.{name}" for field, name in STATE_DICT_ENTRIES.items()}
        sd = {
            prefix: self.packed,
            entry["absmax"]: self.absmax,
            f"{prefix}.quant_map": code_book(self.quant_type, self.device),
        }
        if self.double_quant:
            sd[entry["nested_absmax"]] = self.nested_absmax
            sd[entry["nested_code"]] = self.nested_code
            meta.update(
                nested_blocksize=NESTED_BLOCKSIZE,
                nested_dtype="float32",
                nested_offset=float(self.nested_offset.item()),
            )
        sd[f"{prefix}.quant_state.bitsandbytes__{self.quant_type}"] = _pack_json(meta)
        return sd

    @classmethod
    def from_state_dict(
        cls, sd: Mapping[str, torch.Tensor], prefix: str = "weight", device: torch.device | str | None = None
    ) -> "Quantized4bitWeight":
        """Read a weight saved by bitsandbytes (or by ``state_dict``): every entry of WEIGHT_FIELDS checked against
        the quant state (a malformed one is a ConfigError naming it)."""
        state_keys = [k for k in sd if k.startswith(f"{prefix}.quant_state.bitsandbytes__")]
        if prefix not in sd or len(state_keys) != 1:
            raise ConfigError(
                "4-bit state dict",
                prefix,
                f"needs the codes and exactly one '{prefix}.quant_state.bitsandbytes__<type>' entry, found "
                f"{sorted(k for k in sd if k.startswith(prefix))}",
            )
        source = state_keys[0]
        meta = read_quant_state(sd[source])
        if not isinstance(meta, dict):
            raise ConfigError(source, "quant_state", f"must be a JSON object, got {type(meta).__name__}")
        quant_type, blocksize = meta.get("quant_type"), meta.get("blocksize")
        if quant_type not in QUANT_TYPES:
            raise ConfigError(source, "quant_type", f"must be one of {QUANT_TYPES}, got {quant_type!r}")
        if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in VALID_BLOCKSIZES:
            raise ConfigError(source, "blocksize", f"must be one of {VALID_BLOCKSIZES}, got {blocksize!r}")
        if meta.get("dtype") not in _DTYPES_BY_NAME:
            raise ConfigError(source, "dtype", f"must be one of {sorted(_DTYPES_BY_NAME)}, got {meta.get('dtype')!r}")
        raw_shape = meta.get("shape")
        if not isinstance(raw_shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in raw_shape
        ):
            raise ConfigError(source, "shape", f"must be a list of non-negative integers, got {raw_shape!r}")
        shape = torch.Size(raw_shape)
        quant_map = sd.get(f"{prefix}.quant_map")
        if quant_map is None or not torch.equal(quant_map.float().cpu(), code_book(quant_type)):
            raise ConfigError("4-bit state dict", f"{prefix}.quant_map", f"must be the standard {quant_type} code book")
        double = f"{prefix}.{STATE_DICT_ENTRIES['nested_absmax']}" in sd
        if double and (meta.get("nested_blocksize") != NESTED_BLOCKSIZE or meta.get("nested_dtype") != "float32"):
            raise ConfigError(
                source,
                "nested_blocksize",
                f"and nested_dtype must be {NESTED_BLOCKSIZE} and float32, got {meta.get('nested_blocksize')!r} / "
                f"{meta.get('nested_dtype')!r}",
            )
        n = math.prod(shape)
        nblocks = -(-n // blocksize)
        expected = {  # field -> (dtypes, elements)
            "packed": (None, None),
            "absmax": ((torch.uint8,) if double else (torch.float32,), nblocks),
            "nested_absmax": ((torch.float32,), -(-nblocks // NESTED_BLOCKSIZE)),
            "nested_code": ((torch.float32,), 256),
        }
        device = torch.device(device) if device is not None else sd[prefix].device
        tensors = {}
        for field in WEIGHT_FIELDS:
            if field.optional and not double:
                continue
            if field.entry is None:  # the nested offset: a number in the quant state
                offset = meta.get(field.name)
                if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not _fits_float32(offset):
                    raise ConfigError(source, field.name, f"must be a finite float32 number, got {offset!r}")
                tensors[field.name] = torch.tensor(float(offset), dtype=torch.float32, device=device)
                continue
            key = f"{prefix}.{field.entry}" if field.entry else prefix
            t = sd.get(key)
            if t is None:
                raise ConfigError("4-bit state dict", key, "is missing")
            dtypes, elements = expected[field.name]
            if field.name == "packed":
                if t.numel() * t.element_size() != (n + 1) // 2:
                    raise ConfigError(
                        "4-bit state dict",
                        key,
                        f"holds {t.numel() * t.element_size()} bytes, but shape {list(shape)} needs {(n + 1) // 2}",
                    )
            elif t.dtype not in dtypes or t.numel() != elements:
                raise ConfigError(
                    "4-bit state dict",
                    key,
                    f"must be {dtypes[0]} with {elements} elements (shape {list(shape)}, blocksize {blocksize}), "
                    f"got {t.dtype} with {t.numel()}",
                )
            elif t.is_floating_point() and not t.is_meta and not bool(torch.isfinite(t).all()):
                raise ConfigError("4-bit state dict", key, "holds a NaN or infinite scale")
            tensors[field.name] = t.to(device).reshape(-1) if field.name != "packed" else t.to(device)
        return cls(
            shape=shape, dtype=_DTYPES_BY_NAME[meta["dtype"]], blocksize=blocksize, quant_type=quant_type, **tensors
        )


def _fits_float32(x: float) -> bool:
    """A finite number that stays finite in float32 (where the kernels use it)."""
    return math.isfinite(x) and abs(x) <= torch.finfo(torch.float32).max


def _as_storage(packed: torch.Tensor, quant_storage: torch.dtype) -> torch.Tensor:
    """Bytes [(n + 1) // 2] -> bitsandbytes' stored layout [bytes / itemsize, 1] in quant_storage."""
    if quant_storage == torch.uint8:
        return packed.unsqueeze(1)
    itemsize = torch.empty((), dtype=quant_storage).element_size()
    if packed.numel() % itemsize:
        raise ValueError(
            f"qpeft: {packed.numel()} packed bytes cannot be stored as {quant_storage} "
            f"(not a multiple of {itemsize} bytes)"
        )
    return packed.view(quant_storage).unsqueeze(1)
