#!/usr/bin/env python3
"""The PyTorch baseline of `safedpo bench`: the same DPO/SafeDPO training step with Hugging Face
transformers' GPT2LMHeadModel (or, with --model.arch, LlamaForCausalLM / MistralForCausalLM /
Qwen2ForCausalLM), the same shapes, the same kind of synthetic data, the same JSON fields.

One step: reference forward (no grad) → policy forward on chosen and rejected (one batch of 2P
sequences, no padding: every sequence has the same length) → sequence log-probs of the response
tokens → preference loss → backward → grad-norm clip → AdamW. Phases are timed between device
synchronisations, as in src/bench.rs.

Modes: `eager` (plain PyTorch) and `compile` (torch.compile of the forward + log-prob function of
each model; the backward comes from AOTAutograd). On a GPU the forwards run under bf16 autocast and
AdamW is the fused kernel; on the CPU everything is f32 and AdamW is fused when this torch has it.

    python3 benches/baselines/torch_dpo.py --mode eager --json
    python3 benches/baselines/torch_dpo.py --mode compile --device cuda --peak-flops 989e12 --model.n_layer 12

The shape, the objective, the learning rate and clip, the seed and the device are `safedpo bench`'s
settings, with the same flags (`--model.n_layer`, `--objective.name`, ..., `--set KEY=VALUE`).
"""

import argparse
import copy
import json
import statistics
import sys
import time


# The settings this baseline shares with `safedpo bench`, spelled as safedpo spells them (their TOML
# paths; `-` and `_` interchangeable), with `safedpo bench`'s defaults: (path, type, default, help).
SETTINGS = [
    ("seed", int, 0, "seeds the init and the synthetic tokens"),
    ("device", str, "cpu", "cpu, cuda or cuda:N"),
    ("model.arch", str, "gpt2", "gpt2, llama, mistral or qwen2"),
    ("model.n_layer", int, 4, "transformer blocks"),
    ("model.n_embd", int, 128, "width"),
    ("model.n_head", int, 4, "attention heads"),
    ("model.n_kv_head", int, 0, "key/value heads of the Llama family (0: n_head)"),
    ("model.intermediate_size", int, 0, "MLP width (0: 4 n_embd for gpt2, 8/3 n_embd rounded up to 8 else)"),
    ("model.tie_word_embeddings", lambda v: str(v).lower() in ("1", "true"), False, "tie a Llama-family head"),
    ("model.n_positions", int, 1024, "position embeddings (longest sequence)"),
    ("model.vocab_size", int, 512, "vocabulary"),
    ("objective.name", str, "dpo", "dpo (or sigmoid) or safedpo"),
    ("objective.beta", float, 0.1, "the scale beta of the implicit rewards"),
    ("objective.delta", float, 10.0, "SafeDPO's safety margin"),
    ("optimizer.lr", float, 1e-4, "learning rate (constant)"),
    ("optimizer.grad_clip", float, 1.0, "global grad-norm clip; 0 disables it"),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for path, kind, default, help in SETTINGS:
        names = [f"--{path}"] + ([f"--{path.replace('_', '-')}"] if "_" in path else [])
        metavar = path.rsplit(".", 1)[-1].upper()
        dest = path.replace(".", "__")
        help = f"{help} (default: {default})"
        p.add_argument(*names, dest=dest, metavar=metavar, type=kind, default=default, help=help)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any of the settings above")
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence, prompt + response")
    p.add_argument("--prompt-len", type=int, default=None, help="default: a quarter of --seq-len")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--peak-flops", type=float, default=None, help="device peak FLOP/s, for MFU")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (CPU)")
    p.add_argument("--mode", choices=["eager", "compile"], default="eager")
    p.add_argument("--attn", default="sdpa", help="transformers attn_implementation: sdpa or eager")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    a = p.parse_args(argv)
    kinds = {path: kind for path, kind, _, _ in SETTINGS}
    for item in a.set:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in kinds:
            p.error(f"--set {item}: expected KEY=VALUE with KEY one of {', '.join(kinds)}")
        setattr(a, key.replace(".", "__"), kinds[key](value))
    # Short names for the code below.
    for path, _, _, _ in SETTINGS:
        setattr(a, path.rsplit(".", 1)[-1], getattr(a, path.replace(".", "__")))
    a.objective = {"sigmoid": "dpo"}.get(a.name.lower(), a.name.lower())
    if a.objective not in ("dpo", "safedpo"):
        p.error(f"--objective.name {a.name}: the baseline implements dpo and safedpo")
    if a.prompt_len is None:
        a.prompt_len = max(a.seq_len // 4, 1)
    if not (1 <= a.prompt_len < a.seq_len <= a.n_positions):
        p.error(f"need 1 <= prompt_len ({a.prompt_len}) < seq_len ({a.seq_len}) <= n_positions ({a.n_positions})")
    if a.n_embd % a.n_head:
        p.error(f"--model.n_embd ({a.n_embd}) must be a multiple of --model.n_head ({a.n_head})")
    if a.arch not in ("gpt2", "llama", "mistral", "qwen2"):
        p.error(f"--model.arch {a.arch}: expected gpt2, llama, mistral or qwen2")
    a.n_kv_head = a.n_kv_head or a.n_head
    if not a.intermediate_size:
        swiglu = -(-8 * a.n_embd // 3)  # ceil(8 d / 3)
        a.intermediate_size = 4 * a.n_embd if a.arch == "gpt2" else (swiglu + 7) // 8 * 8
    return a


def forward_flops_per_sequence(a, t):
    """The same count as src/bench/mod.rs: the matrix products (per layer q/k/v, output, MLP up and
    down; the LM head) + causal attention."""
    d, f, hd = a.n_embd, a.intermediate_size, a.n_embd // a.n_head
    q, kv = a.n_head * hd, a.n_kv_head * hd
    up = f if a.arch == "gpt2" else 2 * f
    weights = a.n_layer * (d * (q + 2 * kv) + q * d + d * up + f * d) + d * a.vocab_size
    return 2.0 * t * weights + 2.0 * a.n_layer * q * t * (t + 1.0)


def step_flops(a):
    return 4.0 * 2 * a.pairs * forward_flops_per_sequence(a, a.seq_len)


def make_model(a):
    """The model class and config of `safedpo bench`'s random init of this shape."""
    import transformers as tf

    if a.arch == "gpt2":
        config = tf.GPT2Config(
            vocab_size=a.vocab_size,
            n_positions=a.n_positions,
            n_embd=a.n_embd,
            n_layer=a.n_layer,
            n_head=a.n_head,
            layer_norm_epsilon=1e-5,
            activation_function="gelu_new",
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=True,
            bos_token_id=a.vocab_size - 1,
            eos_token_id=a.vocab_size - 1,
        )
        return tf.GPT2LMHeadModel, config
    classes = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
    }
    config_class, model_class = classes[a.arch]
    config = config_class(
        vocab_size=a.vocab_size,
        hidden_size=a.n_embd,
        intermediate_size=a.intermediate_size,
        num_hidden_layers=a.n_layer,
        num_attention_heads=a.n_head,
        num_key_value_heads=a.n_kv_head,
        max_position_embeddings=a.n_positions,
        rms_norm_eps=1e-5,
        tie_word_embeddings=a.tie_word_embeddings,
        attention_dropout=0.0,
    )
    return model_class, config


def peak_rss_bytes():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def main(argv=None):
    a = parse_args(argv)
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    device = torch.device(a.device)
    on_gpu = device.type == "cuda"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)

    model_class, config = make_model(a)
    policy = model_class._from_config(config, attn_implementation=a.attn).to(device)
    policy.train()
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    num_params = sum(p.numel() for p in policy.parameters())

    # Synthetic batches: row 2i is pair i's chosen sequence, row 2i+1 its rejected one; they share a
    # random prompt. Targets are the next tokens of the response (positions prompt_len-1 .. T-2).
    gen = torch.Generator().manual_seed(a.seed ^ 0x5AFED90B)
    T, P = a.seq_len, a.prompt_len
    batches = []
    for _ in range(max(1, min(4, a.warmup + a.steps))):
        prompt = torch.randint(0, a.vocab_size, (a.pairs, 1, P), generator=gen).expand(a.pairs, 2, P)
        resp = torch.randint(0, a.vocab_size, (a.pairs, 2, T - P), generator=gen)
        ids = torch.cat([prompt, resp], dim=2).reshape(2 * a.pairs, T)
        unsafe = torch.zeros(a.pairs, 2)
        unsafe[:, 1] = (torch.rand(a.pairs, generator=gen) < 0.5).float()  # T(D): chosen safe
        batches.append((ids.to(device), unsafe.to(device)))
    mask = torch.zeros(T - 1, device=device)
    mask[P - 1 :] = 1.0  # loss on predicting tokens P..T-1

    autocast = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16))
        if on_gpu
        else (lambda: torch.autocast("cpu", enabled=False))
    )

    def logits_of(model, ids):
        with autocast():
            return model(input_ids=ids).logits

    def seq_logps_from_logits(logits, ids):
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        tok = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        return (tok * mask).sum(-1)

    def seq_logps(model, ids):
        return seq_logps_from_logits(logits_of(model, ids), ids)

    if a.mode == "compile":
        policy_logps = torch.compile(lambda ids: seq_logps(policy, ids))
        reference_logps = torch.compile(lambda ids: seq_logps(reference, ids))
    else:
        policy_logps = reference_logps = None

    fused = on_gpu
    if not on_gpu:
        try:  # fused CPU AdamW exists in torch >= 2.4
            torch.optim.AdamW([torch.zeros(1, requires_grad=True)], fused=True)
            fused = True
        except (RuntimeError, TypeError):
            fused = False
    opt = torch.optim.AdamW(policy.parameters(), lr=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=fused)

    def step(i):
        ids, unsafe = batches[i % len(batches)]
        phases = {}
        sync()
        t0 = mark = time.perf_counter()

        def lap():
            nonlocal mark
            sync()
            now = time.perf_counter()
            ms = (now - mark) * 1e3
            mark = now
            return ms

        with torch.no_grad():
            ref = reference_logps(ids) if reference_logps else seq_logps(reference, ids)
        phases["reference_forward"] = lap()
        if policy_logps:
            pol = policy_logps(ids)
            phases["policy_forward"] = lap()
            phases["log_probs"] = None
        else:
            logits = logits_of(policy, ids)
            phases["policy_forward"] = lap()
            pol = seq_logps_from_logits(logits, ids)
            phases["log_probs"] = lap()
        pc, pr, rc, rr = pol[0::2], pol[1::2], ref[0::2], ref[1::2]
        h = (pc - rc) - (pr - rr)
        logit = a.beta * h
        if a.objective == "safedpo":
            logit = logit - (unsafe[:, 1] - unsafe[:, 0]) * a.delta
        loss = -F.logsigmoid(logit).mean()
        loss_value = loss.item()  # the trainer reads its metrics every step
        phases["loss"] = lap()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        phases["backward"] = lap()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), a.grad_clip if a.grad_clip > 0 else float("inf"))
        opt.step()
        phases["optimizer"] = lap()
        return (mark - t0) * 1e3, phases, loss_value

    # The peak counts from here, as src/bench.rs resets its backend's after the setup: it holds what
    # the setup left (both models' weights, the batches), the optimizer state, gradients and activations.
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(a.warmup):
        step(i)
    samples = [step(a.warmup + i) for i in range(a.steps)]

    times = [s[0] for s in samples]
    tokens = 2 * a.pairs * a.seq_len
    med = statistics.median(times)
    flops = step_flops(a)

    def phase_median(name):
        vals = [s[1][name] for s in samples]
        return None if vals[0] is None else statistics.median(vals)

    notes = [f"transformers {model_class.__name__}, attn_implementation={a.attn}, AdamW fused={fused}"]
    if on_gpu:
        notes.append("bf16 autocast forwards, f32 log-softmax")
    if a.mode == "compile":
        notes.append("torch.compile of forward + log-probs per model; log-probs timed inside the forwards")
    else:
        notes.append("log-probs (log_softmax + gather + sum) of the policy timed separately")
    report = {
        "engine": f"torch-{a.mode}",
        "device": torch.cuda.get_device_name(device) if on_gpu else f"cpu (torch {torch.__version__})",
        "threads": torch.get_num_threads(),
        "config": {
            "n_layer": a.n_layer,
            "n_embd": a.n_embd,
            "n_head": a.n_head,
            "vocab_size": a.vocab_size,
            "n_positions": a.n_positions,
            "pairs": a.pairs,
            "seq_len": a.seq_len,
            "prompt_len": a.prompt_len,
            "objective": {"name": "dpo", "beta": a.beta}
            if a.objective == "dpo"
            else {"name": "safedpo", "beta": a.beta, "delta": a.delta},
            "warmup_steps": a.warmup,
            "steps": a.steps,
            "seed": a.seed,
            "lr": a.lr,
            "max_grad_norm": a.grad_clip,
            "device": a.device,
            "peak_flops": a.peak_flops,
        },
        "num_params": num_params,
        "policy_tokens_per_step": tokens,
        "tokens_per_s": tokens / (med / 1e3),
        "tokens_per_s_best": tokens / (min(times) / 1e3),
        "step_ms": {"median": med, "mean": statistics.fmean(times), "min": min(times), "max": max(times)},
        "phases_ms": {
            k: phase_median(k)
            for k in ["reference_forward", "policy_forward", "log_probs", "loss", "backward", "optimizer"]
        },
        "flops_per_step": flops,
        "flops_per_s": flops / (med / 1e3),
        "mfu": (flops / (med / 1e3)) / a.peak_flops if a.peak_flops else None,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if on_gpu else peak_rss_bytes(),
        "memory_source": "torch.cuda.max_memory_allocated" if on_gpu else "VmHWM",
        "peak_host_rss_bytes": peak_rss_bytes(),
        "final_loss": samples[-1][2],
        "notes": notes,
    }
    if a.json:
        print(json.dumps(report))
    else:
        r = report
        print(f"{r['engine']} on {r['device']} ({r['threads']} threads), {a.objective}")
        print(
            f"model   {a.arch} L={a.n_layer} d={a.n_embd} heads={a.n_head}/{a.n_kv_head}kv mlp={a.intermediate_size} "
            f"vocab={a.vocab_size} ({num_params / 1e6:.3f} M params)"
        )
        print(f"policy tokens/s   {r['tokens_per_s']:10.0f} (median step)  {r['tokens_per_s_best']:10.0f} (best step)")
        s = r["step_ms"]
        print(f"step time ms      median {s['median']:.2f}  mean {s['mean']:.2f}  min {s['min']:.2f}  max {s['max']:.2f}")
        print(f"model FLOPs       {flops / 1e9:.3f} GFLOP/step, {r['flops_per_s'] / 1e9:.2f} GFLOP/s")
        if r["peak_memory_bytes"]:
            print(f"peak memory       {r['peak_memory_bytes'] / 2**20:.1f} MiB ({r['memory_source']})")
        if on_gpu and r["peak_host_rss_bytes"]:
            print(f"peak host RSS     {r['peak_host_rss_bytes'] / 2**20:.1f} MiB (VmHWM)")
        print(f"final loss        {r['final_loss']:.6f}")
        for k, v in r["phases_ms"].items():
            if v is not None:
                print(f"  {k:<20}{v:10.2f} ms")
        for n in notes:
            print(f"note: {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
