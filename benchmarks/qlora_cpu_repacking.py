"""What turning off bitsandbytes' CPU repacking of 4-bit weights costs, and what it buys, side by side in one run.

On a CPU with AVX512-BF16, bitsandbytes 0.50 repacks a `Linear4bit`'s weights for inference the first time it runs in
eval mode without grad, and keeps them packed: later forwards, training ones included, go through `gemv_4bit`, which
has no backward. `pipeline.modeling.load_base_model` turns that off (`keep_4bit_layers_differentiable`). This script
loads the same 4-bit model twice, once as bitsandbytes leaves it ("repacked") and once as the pipeline loads it
("kept"), and times a no-grad eval forward (what generation and scoring do) and a LoRA training step after an eval
pass, and reports how far each side's adapter gradient is from the gradient of a model that never ran in eval mode.
It prints figures; it is not a test. Pin it to one core:

    OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python benchmarks/qlora_cpu_repacking.py --preset 20m
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def build(base: Path, keep: bool):
    import torch

    from pipeline.config import LoraArgs
    from pipeline.modeling import apply_lora, load_base_model

    model = load_base_model(base, quantize_4bit=True)
    if not keep:  # undo the pipeline's setting: bitsandbytes' own behaviour
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = True
    torch.manual_seed(0)
    model = apply_lora(model, LoraArgs(r=16, alpha=32))
    for name, param in model.named_parameters():  # LoRA B starts at zero, which would hide what reaches A
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    return model


def gradient(model, ids) -> dict:
    model.train()
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() if p.grad is not None else None for n, p in model.named_parameters() if p.requires_grad}


def best_of(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="20m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    import torch
    from transformers import LlamaForCausalLM

    from pipeline.config import ModelArgs
    from pipeline.modeling import build_llama_config
    from pipeline.tokenizer import train_tokenizer

    tmp = Path(tempfile.mkdtemp())
    tokenizer = train_tokenizer([f"word{i} and word{i * 7 % 97}" for i in range(2000)], vocab_size=2048)
    torch.manual_seed(0)
    LlamaForCausalLM(build_llama_config(ModelArgs(preset=args.preset), tokenizer, args.seq_len)).save_pretrained(tmp)
    ids = torch.randint(0, len(tokenizer), (args.batch, args.seq_len), generator=torch.Generator().manual_seed(1))

    reference = gradient(build(tmp, keep=True), ids)  # never ran in eval mode: bitsandbytes' training path
    rows = {}
    for side, keep in (("repacked (bitsandbytes)", False), ("kept (pipeline)", True)):
        model = build(tmp, keep)
        model.eval()

        def forward(model=model):
            with torch.no_grad():
                model(input_ids=ids)

        forward()  # the first eval forward repacks (or not)
        eval_s = best_of(forward, args.rounds)
        got = gradient(model, ids)
        train_s = best_of(lambda model=model: gradient(model, ids), args.rounds)
        lost = sum(g is None for g in got.values())
        worst = max(((g - reference[n]).norm() / reference[n].norm()).item() for n, g in got.items() if g is not None)
        rows[side] = eval_s, train_s, lost, len(got), worst
    print(f"preset {args.preset}, batch {args.batch} x {args.seq_len} tokens, torch threads {torch.get_num_threads()}")
    print(f"{'side':26} {'eval fwd s':>10} {'train step s':>12} {'grads lost':>10} {'worst rel. grad error':>22}")
    for side, (eval_s, train_s, lost, total, worst) in rows.items():
        print(f"{side:26} {eval_s:10.3f} {train_s:12.3f} {lost:>5}/{total:<4} {worst:22.2e}")
    (repacked_eval, repacked_train, *_), (kept_eval, kept_train, *_) = rows.values()
    print(
        f"kept / repacked: eval forward {kept_eval / repacked_eval:.2f}x the time, train step {kept_train / repacked_train:.2f}x"
    )


if __name__ == "__main__":
    main()
