"""LoRA initialisations on the 4-bit base: how close each start is to the float weights, and what that does to
fine-tuning.

1. Reconstruction: per layer, ||W - (dequant(Q) + s B A)||_F / ||W||_F for plain QLoRA (B A = 0), LoftQ (1 and 5
   iterations) and QPiSSA, at rank 16: on the layers of a small model pretrained here on real text, and on one
   layer of each shape of Llama-3.2-1B (random init as transformers draws it: Gaussian, so with no low-rank
   structure to move; the initialisation's time is recorded there).
2. Fine-tuning: the small model (a byte-level Llama, pretrained for a few minutes on the Python documentation that
   ships with Python, pydoc_data, and cached in benchmarks/.cache/) fine-tuned on Python source from the standard
   library, evaluated on held-out modules (the task) and on held-out documentation (what the model knew): bf16 LoRA
   (peft on the bf16 model), plain QLoRA, LoftQ, QPiSSA (qpeft on the same bf16 model, in QLoRA's format and in a
   coarse 4-bit format), the same data order and steps, several seeds, evaluated before and after. The goal:
   LoftQ / QPiSSA close at least half of plain QLoRA's evaluation-loss gap to bf16 LoRA.

    python benchmarks/bench_init.py [--steps 150] [--seeds 5] [--pretrain-steps 3000]
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch
from harness import PROJECTIONS, benchmark_args, print_table, write_results

import qpeft
from qpeft import Quantized4bitWeight
from qpeft.tuners.lora import init

CACHE = Path(__file__).resolve().parent / ".cache"
SMALL = dict(  # a byte-level Llama small enough to pretrain on 2 cores in minutes
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=256,
)
LLAMA_1B_LAYERS = {  # Llama-3.2-1B's projection shapes [out, in]
    "q_proj / o_proj": (2048, 2048),
    "k_proj / v_proj": (512, 2048),
    "gate_proj / up_proj": (8192, 2048),
    "down_proj": (2048, 8192),
}
RANK = 16
SEQ = 128
FORMATS = {  # the base's 4-bit format: QLoRA's, and a coarse one whose larger error shows what the starts recover
    "nf4/64 dq": dict(quant_type="nf4", blocksize=64, double_quant=True),
    "fp4/1024": dict(quant_type="fp4", blocksize=1024, double_quant=False),
}
STARTS = {  # name -> LoraConfig fields of the start
    "QLoRA": dict(init_lora_weights=True),
    "LoftQ-1": dict(init_lora_weights="loftq", loftq_config=qpeft.LoftQConfig(loftq_iter=1)),
    "LoftQ-5": dict(init_lora_weights="loftq", loftq_config=qpeft.LoftQConfig(loftq_iter=5)),
    "QPiSSA": dict(init_lora_weights="pissa"),
}


# ---- data ------------------------------------------------------------------------------------------------------
def documentation_bytes() -> tuple[torch.Tensor, torch.Tensor]:
    """(the first 90% of the bytes, the last 10%): pretraining text and its held-out part."""
    import pydoc_data.topics

    text = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    data = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
    cut = int(len(data) * 0.9)
    return data[:cut], data[cut:]


def source_bytes(modules: list[str]) -> torch.Tensor:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "\n\n".join((stdlib / m).read_text(encoding="utf-8") for m in modules)
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


TRAIN_SOURCE = ["argparse.py", "ast.py", "calendar.py", "csv.py", "dataclasses.py", "difflib.py", "fractions.py"]
EVAL_SOURCE = ["textwrap.py", "shlex.py", "heapq.py", "bisect.py", "colorsys.py"]


def windows(data: torch.Tensor, n: int, batch: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - SEQ - 1, (n, batch), generator=g)
    return [torch.stack([data[s : s + SEQ] for s in row.tolist()]) for row in starts]


# ---- the pretrained small model --------------------------------------------------------------------------------
def pretrained(steps: int):
    import transformers

    key = hashlib.sha256(json.dumps([SMALL, steps, SEQ], sort_keys=True).encode()).hexdigest()[:12]
    folder = CACHE / f"init_small_{key}"
    if (folder / "config.json").is_file():
        return transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32), json.loads(
            (folder / "pretrain.json").read_text()
        )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL))
    data, _ = documentation_bytes()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    start, losses = time.time(), []
    for step, ids in enumerate(windows(data, steps, 16, seed=1)):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 100 == 0:
            print(f"pretraining step {step}: loss {loss.item():.3f}", file=sys.stderr)
    info = {"steps": steps, "seconds": round(time.time() - start, 1), "final_loss": statistics.mean(losses[-20:])}
    model.save_pretrained(folder)
    (folder / "pretrain.json").write_text(json.dumps(info))
    return model, info


# ---- 1. reconstruction -----------------------------------------------------------------------------------------
def errors_of(W: torch.Tensor, fmt: dict, scaling: float = 1.0) -> dict:
    quantize = functools.partial(Quantized4bitWeight.from_float, **fmt)
    out = {"QLoRA": init.relative_error(W, init.Start(quantize(W), *_zero(W)), scaling)}
    for name, fields in STARTS.items():
        if name == "QLoRA":
            continue
        iterations = fields.get("loftq_config", qpeft.LoftQConfig()).loftq_iter
        begin = time.perf_counter()
        start = init.start(fields["init_lora_weights"], W, RANK, scaling, quantize, iterations)
        out[name] = init.relative_error(W, start, scaling)
        out[name + " s"] = time.perf_counter() - begin
    return out


def _zero(W):
    return torch.zeros(RANK, W.shape[1]), torch.zeros(W.shape[0], RANK)


def reconstruction_rows(model) -> list[dict]:
    rows = []
    for fmt, fields in FORMATS.items():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.split(".")[-1] in PROJECTIONS:
                W = module.weight.detach().to(torch.bfloat16)
                row = {"part": "reconstruction", "model": "small pretrained", "format": fmt, "layer": name}
                rows.append({**row, **errors_of(W, fields)})
    g = torch.Generator().manual_seed(0)
    for name, shape in LLAMA_1B_LAYERS.items():
        W = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        row = {"part": "reconstruction", "model": "llama-1b shape, random init", "format": "nf4/64 dq", "layer": name}
        rows.append({**row, **errors_of(W, FORMATS["nf4/64 dq"])})
    return rows


# ---- 2. fine-tuning --------------------------------------------------------------------------------------------
def eval_loss(model, batches) -> float:
    was = model.training
    model.eval()
    with torch.no_grad():
        losses = [model(input_ids=ids, labels=ids).loss.float().item() for ids in batches]
    model.train(was)
    return statistics.mean(losses)


def variant(name: str, fmt: str | None, base_bf16):
    """A fresh model of start ``name`` on base format ``fmt`` (None: peft on the bf16 model), on a copy of the bf16
    pretrained model."""
    model = copy.deepcopy(base_bf16)
    fields = dict(r=RANK, lora_alpha=RANK, target_modules=PROJECTIONS)
    if fmt is None:
        import peft

        return peft.get_peft_model(model, peft.LoraConfig(**fields))
    return qpeft.get_peft_model(model, qpeft.LoraConfig(**fields, **STARTS[name], **FORMATS[fmt]))


def finetune_rows(base_bf16, steps: int, seeds: int, train, held_out: dict) -> list[dict]:
    rows = []
    for seed in range(seeds):
        batches = windows(train, steps, 8, seed=100 + seed)
        for name, fmt in [("bf16 LoRA", None)] + [(n, f) for f in FORMATS for n in STARTS]:
            torch.manual_seed(seed)
            model = variant(name, fmt, base_bf16)
            model.train()
            start = {f"{k}_start": eval_loss(model, b) for k, b in held_out.items()}
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
            for ids in batches:
                model(input_ids=ids, labels=ids).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            rows.append(
                {
                    "part": "finetune",
                    "variant": name,
                    "format": fmt,
                    "seed": seed,
                    **start,
                    **{k: eval_loss(model, b) for k, b in held_out.items()},
                }
            )
            print(f"seed {seed} {name} {fmt}: {rows[-1]}", file=sys.stderr)
    return rows


EVALS = ("source", "source_start", "docs", "docs_start")  # held-out Python source (the task), documentation


def summary(rows: list[dict]) -> list[dict]:
    """Per variant and format, the mean losses over seeds and the share of plain QLoRA's gap to bf16 LoRA (in the
    same base format) each start closes, at the start and after fine-tuning."""
    tuned = [r for r in rows if r["part"] == "finetune"]
    keys = list(dict.fromkeys((r["variant"], r["format"]) for r in tuned))
    mean = {
        key: {k: statistics.mean(r[k] for r in tuned if (r["variant"], r["format"]) == key) for k in EVALS}
        for key in keys
    }
    bf16 = mean["bf16 LoRA", None]
    out = []
    for (name, fmt), m in mean.items():
        row = {"part": "summary", "variant": name, "format": fmt, **m}
        if fmt is not None:
            plain = mean["QLoRA", fmt]
            for k in EVALS:
                gap = plain[k] - bf16[k]
                row[f"{k} gap closed"] = (plain[k] - m[k]) / gap if gap > 0 else None
            recon = [
                r[name]
                for r in rows
                if r["part"] == "reconstruction" and r["model"] == "small pretrained" and r["format"] == fmt
            ]
            row["mean_reconstruction_error"] = statistics.mean(recon)
        out.append(row)
    return out


def main() -> None:
    def options(parser):
        parser.add_argument("--steps", type=int, default=150)
        parser.add_argument("--seeds", type=int, default=5)
        parser.add_argument("--pretrain-steps", type=int, default=3000)

    args = benchmark_args(__doc__.splitlines()[0], options)
    torch.manual_seed(0)
    model, info = pretrained(args.pretrain_steps)
    base = model.to(torch.bfloat16)
    rows = reconstruction_rows(base)
    train = source_bytes(TRAIN_SOURCE)
    held_out = {
        "source": windows(source_bytes(EVAL_SOURCE), 16, 8, seed=7),
        "docs": windows(documentation_bytes()[1], 16, 8, seed=7),
    }
    rows += finetune_rows(base, args.steps, args.seeds, train, held_out)
    rows += summary(rows)
    rows.append(
        {
            "part": "setup",
            "small_model": SMALL,
            "pretraining": info,
            "rank": RANK,
            "seq": SEQ,
            "finetune_steps": args.steps,
            "seeds": args.seeds,
        }
    )
    print_table(
        [r for r in rows if r["part"] == "reconstruction"],
        ["model", "format", "layer", "QLoRA", "LoftQ-1", "LoftQ-5", "QPiSSA", "LoftQ-5 s", "QPiSSA s"],
    )
    print_table(
        [r for r in rows if r["part"] == "summary"],
        ["variant", "format", *EVALS, *(k + " gap closed" for k in EVALS), "mean_reconstruction_error"],
    )
    print(write_results("init", args.device, rows, args.out))


if __name__ == "__main__":
    main()
