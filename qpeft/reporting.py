"""peft's parameter report for a wrapped model, and qpeft's memory split (4-bit layers / trainable / other)."""

from __future__ import annotations

from torch import nn

from .nn.linear4bit import Linear4bit


class ParameterReport:
    """Mixed into QPeftModel (an nn.Module)."""

    def get_nb_trainable_parameters(self: nn.Module) -> tuple[int, int]:
        """(trainable, all) parameter counts; a 4-bit weight counts its elements (bytes * 2), as peft does."""
        trainable = total = 0
        for module in self.modules():
            for name, p in module.named_parameters(recurse=False):
                n = p.numel()
                if isinstance(module, Linear4bit) and name == "weight":
                    n = module.in_features * module.out_features
                total += n
                trainable += n if p.requires_grad else 0
        return trainable, total

    def memory_footprint(self: nn.Module) -> dict[str, int]:
        """Bytes of the 4-bit layers (codes and scales, with their biases), of the trainable tensors, and of the
        rest of the model's parameters and buffers."""
        four_bit = {
            id(t): t.untyped_storage().nbytes()
            for m in self.modules()
            if isinstance(m, Linear4bit)
            for t in (*m.parameters(), *m.buffers())
        }
        trainable = {id(p): p.untyped_storage().nbytes() for p in self.parameters() if p.requires_grad}
        rest = {
            id(t): t.untyped_storage().nbytes()
            for t in (*self.parameters(), *self.buffers())
            if id(t) not in four_bit and id(t) not in trainable
        }
        return {
            "4bit_layers": sum(four_bit.values()),
            "trainable": sum(trainable.values()),
            "other": sum(rest.values()),
        }

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}"
        )
        mib = {k: v / 2**20 for k, v in self.memory_footprint().items()}
        print(
            f"weights: 4-bit layers {mib['4bit_layers']:.2f} MiB || trainable {mib['trainable']:.2f} MiB || "
            f"other {mib['other']:.2f} MiB"
        )
