"""Plot the layer benchmark's JSON: time relative to the dense frozen linear (1.0 = dense) for qpeft and
bitsandbytes + peft, forward and forward+backward, one group of bars per shape. Writes <json stem>.png beside it.

    python benchmarks/plot_results.py DIR_OR_JSON [...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def plot_layer(path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(path.read_text())
    rows, env = data["rows"], data["environment"]
    labels = [f"M={r['M']}\n{r['K']}->{r['N']}" for r in rows]
    series = [
        ("qpeft fwd", "qpeft_fwd_ms", "dense_fwd_ms"),
        ("bnb+peft fwd", "bnb_peft_fwd_ms", "dense_fwd_ms"),
        ("qpeft fwd+bwd", "qpeft_fb_ms", "dense_fb_ms"),
        ("bnb+peft fwd+bwd", "bnb_peft_fb_ms", "dense_fb_ms"),
    ]
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(rows)), 4.5))
    width = 0.8 / len(series)
    for i, (name, num, den) in enumerate(series):
        values = [r[num] / r[den] if r.get(num) is not None else 0.0 for r in rows]
        ax.bar([j + (i - 1.5) * width for j in range(len(rows))], values, width, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylabel("time / dense frozen linear (lower is better)")
    ax.set_title(
        f"QLoRA layer, NF4 double quant, r=16, dropout 0.05, {rows[0]['dtype']} — {env['device']}\n"
        f"{env['date']}, torch {env['torch']}, bitsandbytes {env.get('bitsandbytes')}",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=120)
    return out


def main() -> None:
    paths = []
    for arg in sys.argv[1:] or ["benchmarks/results"]:
        p = Path(arg)
        paths += sorted(p.glob("lora_layer_*.json")) if p.is_dir() else [p]
    for p in paths:
        print("wrote", plot_layer(p))


if __name__ == "__main__":
    main()
