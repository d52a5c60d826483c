#!/usr/bin/env python3
"""PyTorch's causal attention (scaled_dot_product_attention, whichever backend it picks) at the shapes
of `cargo bench --bench kernels_cuda`'s attention group, counted the same way, so the two print
comparable GFLOP/s: 16 sequences of 512 tokens, GPT-2 124M's 12 heads of 64 and a Llama-style
grouped-query layout (32 query heads, 8 key/value heads of 64), bf16, forward and forward+backward.

FLOPs, as the Rust bench counts them: QKᵀ and AV over the t(t+1)/2 unmasked pairs of each sequence,
2 FLOPs a multiply-add: seqs · 2 · (n_head · hd) · T(T+1) for the forward, twice that for the backward
(timed alone, on the graph of one forward, as the Rust bench times it).

    python3 benches/baselines/torch_attention.py [--device cuda] [--iters 50] [--json]
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F

LAYOUTS = {"mha h12 hd64": (12, 12, 64), "gqa h32/8 hd64": (32, 8, 64)}


def timed(fn, iters, device):
    for _ in range(3):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seqs", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    rows = []
    for name, (n_head, n_kv, hd) in LAYOUTS.items():
        shape = (a.seqs, n_head, a.seq_len, hd)
        q = torch.randn(shape, device=a.device, dtype=dtype, requires_grad=True)
        k = torch.randn((a.seqs, n_kv, a.seq_len, hd), device=a.device, dtype=dtype, requires_grad=True)
        v = torch.randn_like(k, requires_grad=True)
        dout = torch.randn(shape, device=a.device, dtype=dtype)
        gqa = n_kv != n_head

        def forward():
            with torch.no_grad():
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)

        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)

        def backward():  # the backward alone, on the graph of one forward
            torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)

        t_fwd = timed(forward, a.iters, a.device)
        t_bwd = timed(backward, a.iters, a.device)
        flops = a.seqs * 2 * n_head * hd * a.seq_len * (a.seq_len + 1)
        rows.append({"layout": name, "shape": f"{a.seqs}x{a.seq_len}", "dtype": str(dtype).split(".")[-1],
                     "fwd_ms": t_fwd * 1e3, "bwd_ms": t_bwd * 1e3,
                     "fwd_gflops": flops / t_fwd / 1e9, "bwd_gflops": 2 * flops / t_bwd / 1e9})
    result = {"device": a.device, "gpu": torch.cuda.get_device_name() if a.device == "cuda" else None,
              "torch": torch.__version__, "rows": rows}
    if a.json:
        print(json.dumps(result))
    else:
        print(f"torch {torch.__version__} on {result['gpu'] or a.device}: scaled_dot_product_attention, causal")
        for r in rows:
            print(f"  {r['layout']:<16} {r['shape']} {r['dtype']}: fwd {r['fwd_ms']:.3f} ms ({r['fwd_gflops']:.0f} GFLOP/s), "
                  f"bwd {r['bwd_ms']:.3f} ms ({r['bwd_gflops']:.0f} GFLOP/s)")


if __name__ == "__main__":
    main()
