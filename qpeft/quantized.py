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
from .formats import NESTED_BLOCKSIZE, code_book

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_DTYPES_BY_NAME = {name: dtype for dtype, name in _DTYPE_NAMES.items()}


def _pack_json(meta: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)


_MAX_QUANT_STATE_BYTES = 1 << 16  # bitsandbytes' quant_state JSON is ~150 bytes


# Field -> its bitsandbytes state-dict entry after "<prefix>." (the packed codes are "<prefix>" itself; the nested
# offset lives in the quant state's JSON).
STATE_DICT_ENTRIES = {"absmax": "absmax", "nested_absmax": "nested_absmax", "nested_code": "nested_quant_map"}


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
        names = ("packed", "absmax", "nested_absmax", "nested_code", "nested_offset")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

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
        """Read a weight saved by bitsandbytes (or by ``state_dict``). Raises ValueError naming what is wrong."""

        def get(key: str) -> torch.Tensor:
            if f"{prefix}.{key}" not in sd:
                raise ValueError(f"qpeft: 4-bit state dict has no '{prefix}.{key}'")
            return sd[f"{prefix}.{key}"]

        state_keys = [k for k in sd if k.startswith(f"{prefix}.quant_state.bitsandbytes__")]
        if prefix not in sd or len(state_keys) != 1:
            raise ValueError(
                f"qpeft: expected '{prefix}' and exactly one '{prefix}.quant_state.bitsandbytes__<type>' "
                f"key, found {sorted(k for k in sd if k.startswith(prefix))}"
            )
        meta = read_quant_state(sd[state_keys[0]])
        if not isinstance(meta, dict):
            raise ConfigError(state_keys[0], "quant_state", f"must be a JSON object, got {type(meta).__name__}")
        quant_type, blocksize = meta.get("quant_type"), meta.get("blocksize")
        F.check_quant_type(quant_type)
        F.check_blocksize(blocksize)
        if meta.get("dtype") not in _DTYPES_BY_NAME:
            raise ValueError(f"qpeft: unsupported weight dtype {meta.get('dtype')!r} in {state_keys[0]}")
        raw_shape = meta.get("shape")
        if not isinstance(raw_shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in raw_shape
        ):
            raise ConfigError(state_keys[0], "shape", f"must be a list of non-negative integers, got {raw_shape!r}")
        shape = torch.Size(raw_shape)
        device = torch.device(device) if device is not None else sd[prefix].device
        packed = sd[prefix].to(device)
        absmax = get(STATE_DICT_ENTRIES["absmax"]).to(device)
        quant_map = get("quant_map")
        if not torch.equal(quant_map.float().cpu(), code_book(quant_type)):
            raise ValueError(f"qpeft: '{prefix}.quant_map' is not the standard {quant_type} code book")
        n = math.prod(shape)
        nblocks = -(-n // blocksize)
        if packed.numel() * packed.element_size() != (n + 1) // 2:
            raise ValueError(
                f"qpeft: '{prefix}' holds {packed.numel() * packed.element_size()} bytes, but shape "
                f"{list(shape)} needs {(n + 1) // 2}"
            )
        if absmax.numel() != nblocks:
            raise ValueError(
                f"qpeft: '{prefix}.absmax' has {absmax.numel()} elements, expected {nblocks} "
                f"(shape {list(shape)}, blocksize {blocksize})"
            )
        nested = {}
        if f"{prefix}.{STATE_DICT_ENTRIES['nested_absmax']}" in sd:
            if meta.get("nested_blocksize") != NESTED_BLOCKSIZE or meta.get("nested_dtype") != "float32":
                raise ValueError(
                    f"qpeft: unsupported nested quantization {meta.get('nested_blocksize')!r}/"
                    f"{meta.get('nested_dtype')!r} (only blocksize 256, float32)"
                )
            if absmax.dtype != torch.uint8:
                raise ValueError(f"qpeft: double-quantized '{prefix}.absmax' must be uint8, got {absmax.dtype}")
            nested_absmax, nested_code = (
                get(STATE_DICT_ENTRIES["nested_absmax"]),
                get(STATE_DICT_ENTRIES["nested_code"]),
            )
            offset = meta.get("nested_offset")
            if nested_absmax.numel() != -(-nblocks // NESTED_BLOCKSIZE):
                raise ValueError(
                    f"qpeft: '{prefix}.nested_absmax' has {nested_absmax.numel()} elements, expected "
                    f"{-(-nblocks // NESTED_BLOCKSIZE)} (one per {NESTED_BLOCKSIZE} blocks)"
                )
            if nested_code.numel() != 256:
                raise ValueError(f"qpeft: '{prefix}.nested_quant_map' has {nested_code.numel()} elements, expected 256")
            if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not math.isfinite(offset):
                raise ConfigError(state_keys[0], "nested_offset", f"must be a finite number, got {offset!r}")
            nested = dict(
                nested_absmax=nested_absmax.to(device, torch.float32),
                nested_code=nested_code.to(device, torch.float32),
                nested_offset=torch.tensor(float(offset), dtype=torch.float32, device=device),
            )
        elif absmax.dtype != torch.float32:
            raise ValueError(
                f"qpeft: '{prefix}.absmax' must be float32 without double quantization, got {absmax.dtype}"
            )
        return cls(packed, absmax, shape, _DTYPES_BY_NAME[meta["dtype"]], blocksize, quant_type, **nested)


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
