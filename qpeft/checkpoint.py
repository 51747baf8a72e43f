"""Hugging Face / bitsandbytes 4-bit checkpoints, read straight into qpeft modules and written so that transformers
+ bitsandbytes load them.

A checkpoint folder is ``config.json`` (with ``quantization_config``: quant_method "bitsandbytes",
load_in_4bit, bnb_4bit_quant_type, bnb_4bit_use_double_quant, bnb_4bit_compute_dtype, llm_int8_skip_modules)
plus ``model.safetensors`` or shards listed in ``model.safetensors.index.json``. A linear layer is 4-bit exactly
when the checkpoint holds its ``<name>.weight.quant_state.bitsandbytes__<type>`` entry; its tensors use
bitsandbytes' keys (``qpeft.Quantized4bitWeight.state_dict``). Never unpickles.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError
from .formats import WEIGHT_FIELDS
from .files import read_json_file, write_json_atomic, write_safetensors_atomic
from .hub import CHECKPOINT_FILES, resolve_folder
from .nn.adapter_holder import AdapterLayer4bit, NamedAdapters
from .nn.linear4bit import Linear4bit, is_conv1d
from .nn.modules_to_save import ModulesToSave
from .tuners.targets import set_submodule

_QUANT_STATE = ".weight.quant_state.bitsandbytes__"


_SAFETENSORS_DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}


class SafetensorsFolder:
    """The tensors of a folder's model.safetensors, or of the shards its model.safetensors.index.json lists: read
    whole, by rows (only those bytes leave the file), or as meta tensors (shape and dtype, nothing read).
    ``bytes_read`` counts what was read."""

    def __init__(self, folder: str | Path):
        import safetensors
        from safetensors import safe_open

        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            source = str(index)
            raw = read_json_file(index, "weight_map")
            weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ConfigError(source, "weight_map", "must map tensor names to shard file names")
            shards = sorted(set(weight_map.values()))
            for shard in shards:  # shard names come from the file: they must name files in this folder
                if Path(shard).name != shard or shard in (".", ".."):
                    raise ConfigError(source, "weight_map", f"names a shard outside the folder: {shard!r}")
        else:
            if not (folder / "model.safetensors").is_file():
                raise FileNotFoundError(
                    f"qpeft: no model.safetensors (or index) in {folder}; pickle checkpoints are not read"
                )
            shards = ["model.safetensors"]
        self._files, self._where = {}, {}
        for shard in shards:
            path = folder / shard
            try:
                handle = self._files[shard] = safe_open(str(path), framework="pt")
            except (OSError, safetensors.SafetensorError) as e:
                raise ConfigError(str(path), "safetensors", f"cannot be read: {e}") from None
            self._where.update(dict.fromkeys(handle.keys(), shard))
        if index.is_file():  # the index says which shard holds each tensor; a tensor elsewhere too is not read
            absent = [k for k, shard in weight_map.items() if k not in self._files[shard].keys()]
            if absent:
                raise ConfigError(source, "weight_map", f"names tensors its shards do not hold: {absent[:5]}")
            self._where = dict(weight_map)
        self.bytes_read = 0

    def keys(self) -> list[str]:
        return list(self._where)

    def _slice(self, key: str):
        return self._files[self._where[key]].get_slice(key)

    def meta(self, key: str) -> torch.Tensor:
        """A meta tensor of ``key``'s shape and dtype."""
        view = self._slice(key)
        dtype = _SAFETENSORS_DTYPES.get(view.get_dtype())
        if dtype is None:
            raise ValueError(f"qpeft: '{key}' has dtype {view.get_dtype()}, which qpeft does not read")
        return torch.empty(view.get_shape(), dtype=dtype, device="meta")

    def read(self, key: str) -> torch.Tensor:
        t = self._files[self._where[key]].get_tensor(key)
        self.bytes_read += t.nbytes
        return t

    def read_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of ``key`` (dim 0)."""
        t = self._slice(key)[start:stop]
        self.bytes_read += t.nbytes
        return t


def read_safetensors_folder(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of model.safetensors or of the shards its index lists."""
    files = SafetensorsFolder(folder)
    return {key: files.read(key) for key in files.keys()}


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (no memory, no init), marked unloaded, while
    buffers (rotary frequencies and the like, not in checkpoints) are real."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
            module._parameters[name]._qpeft_unloaded = True

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _dtype(name, source: str) -> torch.dtype | None:
    """bnb_4bit_compute_dtype of a checkpoint's config: None / "auto", or the name of a float dtype."""
    if name in (None, "auto"):
        return None
    dtype = name if isinstance(name, torch.dtype) else getattr(torch, str(name).removeprefix("torch."), None)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ConfigError(source, "bnb_4bit_compute_dtype", f"must be float32, float16 or bfloat16, got {name!r}")
    return dtype


def load_4bit_pretrained(
    folder: str | Path,
    model_class=None,
    compute_dtype: torch.dtype | None = None,
    dtype: torch.dtype | None = None,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
) -> nn.Module:
    """A transformers model from a bitsandbytes 4-bit checkpoint (a local folder or a Hub repository id: its
    config and safetensors fetched into the Hub cache), its 4-bit linear layers as qpeft.nn.Linear4bit holding
    the checkpoint's exact bytes (nothing is dequantized or requantized).

    model_class: default transformers.AutoModelForCausalLM. compute_dtype: default the checkpoint's
    bnb_4bit_compute_dtype. dtype: of the unquantized tensors (default: as stored)."""
    folder = resolve_folder(folder, CHECKPOINT_FILES, subfolder=subfolder, revision=revision, token=token)
    require_config(folder)
    return build_4bit_model(folder, read_safetensors_folder(folder), model_class, compute_dtype, dtype)


def require_config(folder: Path) -> None:
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"qpeft: no config.json in {folder}")


def is_quant_metadata(key: str) -> bool:
    """A 4-bit weight's small fixed-size entries (code books, the quant state's JSON), as opposed to its codes and
    scales."""
    return key.endswith((".quant_map", ".nested_quant_map")) or _QUANT_STATE in key


_SCALE_ENTRIES = tuple(f".weight.{f.entry}" for f in WEIGHT_FIELDS if f.entry and f.sharded)  # the block scales


def is_checked_whole(key: str) -> bool:
    """The entries a sharded load reads whole on every rank before anything is sharded, so they are checked as
    load_4bit_pretrained checks them (NaN scales, code books, the quant state): the metadata and the block scales
    (1/8 of the codes' bytes or less), as opposed to the codes."""
    return is_quant_metadata(key) or key.endswith(_SCALE_ENTRIES)


def build_4bit_model(
    folder: Path,
    tensors: dict[str, torch.Tensor],
    model_class=None,
    compute_dtype: torch.dtype | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """The model of ``folder``'s config.json (checked by ``require_config`` first) holding ``tensors`` (the
    checkpoint's, by its keys), its 4-bit layers as Linear4bit. Meta tensors give a model on the meta device of the
    checkpoint's shapes and dtypes (the quant state entries must be real)."""
    import transformers

    read_json_file(folder / "config.json", "config")  # size and syntax checked before transformers reads it
    config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=False)  # never code from a folder
    qconfig = getattr(config, "quantization_config", None) or {}
    if not isinstance(qconfig, dict):
        qconfig = qconfig.to_dict()
    if qconfig and not qconfig.get("load_in_4bit", qconfig.get("_load_in_4bit", False)):
        raise ValueError(f"qpeft: {folder} is not a 4-bit bitsandbytes checkpoint (quantization_config {qconfig})")
    compute_dtype = compute_dtype or _dtype(qconfig.get("bnb_4bit_compute_dtype"), str(folder / "config.json"))
    quantized = {k[: k.index(_QUANT_STATE)] for k in tensors if _QUANT_STATE in k}
    if not quantized:
        raise ValueError(f"qpeft: {folder} holds no 4-bit layers (no '*{_QUANT_STATE}*' entries)")
    if dtype is not None:
        tensors = {
            k: (t.to(dtype) if t.is_floating_point() and not _is_quant_key(k, quantized) else t)
            for k, t in tensors.items()
        }
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # build the plain architecture; qpeft provides the 4-bit layers
    model_class = model_class or transformers.AutoModelForCausalLM
    _check_config_fits(folder, model_class, config, tensors, quantized)
    with _parameters_on_meta():
        model = model_class.from_config(config, trust_remote_code=False)
    for name in quantized:
        linear = model.get_submodule(name)
        conv1d = is_conv1d(linear)
        if isinstance(linear, nn.Linear):
            in_features, out_features = linear.in_features, linear.out_features
        elif conv1d:  # transformers quantized its [in, out] weight transposed, as qpeft does
            in_features, out_features = linear.weight.shape
        else:
            raise ValueError(f"qpeft: the checkpoint quantizes {name!r}, a {type(linear).__name__} in the model")
        bias = f"{name}.bias" in tensors  # the checkpoint's (a BitFit model may have added one)
        layer = Linear4bit(in_features, out_features, bias=bias, compute_dtype=compute_dtype, device="meta")
        layer.fan_in_fan_out = conv1d
        if layer.bias is not None:
            layer.bias._qpeft_unloaded = True
        set_submodule(model, name, layer)
    result = model.load_state_dict(tensors, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    unloaded = [n for n, p in model.named_parameters() if getattr(p, "_qpeft_unloaded", False)]
    if unloaded or result.unexpected_keys:
        raise ValueError(
            f"qpeft: checkpoint {folder} does not fit the model: missing {unloaded[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    model.config.quantization_config = qconfig
    return model.eval()


def _check_config_fits(folder: Path, model_class, config, tensors: dict, quantized: set[str]) -> None:
    """The architecture config.json describes, built on the meta device (nothing allocated), holds exactly the
    checkpoint's parameters with the checkpoint's shapes: a config whose sizes disagree with the file (a vocab of
    10^12, say) is refused before the model is built for real."""
    from .quantized import read_quant_state
    from .tuners.config import text_config
    from .tuners.targets import layer_index

    source = str(folder / "config.json")
    layers = getattr(text_config(config), "num_hidden_layers", None)
    held = {layer_index(key, None) for key in tensors} - {None}
    if isinstance(layers, int) and layers > max(held, default=-1) + 1:  # (checked first: building them is slow)
        raise ConfigError(source, "num_hidden_layers", f"is {layers}, but the checkpoint holds {len(held)} layers")
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in model_class.from_config(config).named_parameters()}
    for name in quantized:
        state = next(k for k in tensors if k.startswith(f"{name}.weight.quant_state."))
        stored = read_quant_state(tensors[state]).get("shape")
        expected = shapes.get(f"{name}.weight")
        if expected is None or (list(expected) != stored and list(expected[::-1]) != stored):
            raise ConfigError(
                source, "config", f"gives {name}.weight the shape {expected}, but the checkpoint holds {stored}"
            )
    for name, shape in shapes.items():
        if name.removesuffix(".weight") in quantized:
            continue
        if name not in tensors:
            raise ConfigError(source, "config", f"describes {name}, which the checkpoint does not hold")
        if tuple(tensors[name].shape) != shape:
            raise ConfigError(
                source,
                "config",
                f"gives {name} the shape {list(shape)}, but the checkpoint holds {list(tensors[name].shape)}",
            )


def _is_quant_key(key: str, quantized: set[str]) -> bool:
    return any(key.startswith(name + ".weight") for name in quantized)


def quantized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as a 4-bit checkpoint holds it: Linear4bit layers with bitsandbytes' keys; an adapter
    layer (its ``BASE_CHILD``, the frozen base) and a modules_to_save wrapper (its original module) under the
    module's own name; other adapter sets (bottleneck adapters) left out. Adapters are saved separately, in peft's
    format."""
    kept_child, dropped = {}, []  # module name + "." -> the child whose entries stand for the module
    for name, m in model.named_modules():
        if isinstance(m, (AdapterLayer4bit, ModulesToSave)):
            kept_child[name + "."] = m.BASE_CHILD + "."
        elif isinstance(m, NamedAdapters):
            dropped.append(name + ".")
    out = {}
    for key, t in model.state_dict().items():
        if any(key.startswith(prefix) for prefix in dropped):
            continue
        for prefix, child in kept_child.items():
            if key.startswith(prefix):
                rest = key[len(prefix) :]
                key = prefix + rest[len(child) :] if rest.startswith(child) else None
                break
        if key is not None:
            out[key] = t
    return out


def bitsandbytes_quantization_config(
    quant_type: str,
    double_quant: bool,
    compute_dtype: torch.dtype,
    quant_storage: torch.dtype,
    skip_modules: list[str] | None = None,
) -> dict:
    """The quantization_config of a bitsandbytes 4-bit checkpoint (config.json), as BitsAndBytesConfig writes it.
    ``compute_dtype``: the layers' own, else the weights' dtype (they compute in their inputs', the model's)."""
    name = lambda dtype: str(dtype).removeprefix("torch.")  # noqa: E731
    return {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_compute_dtype": name(compute_dtype),
        "bnb_4bit_quant_storage": name(quant_storage),
        "llm_int8_skip_modules": skip_modules,
        "llm_int8_threshold": 6.0,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_enable_fp32_cpu_offload": False,
    }


def save_4bit_pretrained(model: nn.Module, folder: str | Path) -> None:
    """Writes ``model`` (a transformers model whose linear layers are qpeft Linear4bit or adapter layers; qpeft's
    QPeftModel is unwrapped) as a bitsandbytes 4-bit checkpoint: config.json with quantization_config and
    model.safetensors. transformers + bitsandbytes load it with from_pretrained. All or nothing per folder: an
    interrupted save leaves no config.json, so nothing loads a half-written folder."""
    from .model import QPeftModel

    if isinstance(model, QPeftModel):
        model = model.base_model
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    if not layers:
        raise ValueError("qpeft: the model has no 4-bit layers to save")
    q = layers[0].quantized_weight
    if any(
        layer.quantized_weight.quant_type != q.quant_type or layer.quantized_weight.double_quant != q.double_quant
        for layer in layers
    ):
        raise ValueError("qpeft: a bitsandbytes checkpoint has one quant_type / double_quant for all layers")
    state = quantized_state_dict(model)
    tied = getattr(model, "_tied_weights_keys", None) or []
    if getattr(model.config, "tie_word_embeddings", False):
        for key in tied if isinstance(tied, (list, tuple)) else list(tied):
            state.pop(key, None)
    seen, tensors = {}, {}
    for key, t in state.items():  # safetensors stores no shared storage: keep the first of aliases
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ptr in seen and t.numel():
            continue
        seen[ptr] = key
        tensors[key] = t.detach().cpu().contiguous()
    # config.json is the folder's completion mark (loading requires it): removed first, written last, so an
    # interrupted save leaves a folder that is refused, never new weights under an old config; a stale index
    # (from a sharded save) would shadow the new model.safetensors
    (folder / "config.json").unlink(missing_ok=True)
    (folder / "model.safetensors.index.json").unlink(missing_ok=True)
    write_safetensors_atomic(folder / "model.safetensors", tensors)
    qconfig = bitsandbytes_quantization_config(
        q.quant_type, q.double_quant, layers[0].compute_dtype or layers[0].weight_dtype, layers[0].quant_storage
    )
    config = model.config.to_dict()
    config["quantization_config"] = qconfig
    write_json_atomic(folder / "config.json", config)
