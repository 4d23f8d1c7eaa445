"""Decode speed of the baseline: KV cache vs recomputing the window vs Hugging Face `generate`.

    python bench/generate.py [--new-tokens 128] [--prompt 32] [--batches 1,8] [--repeats 3]

One process, same weights for every row: a baseline run is trained for one step into a
temporary folder (`menagerie train` defaults: d=256, 4 layers, byte vocabulary), loaded with
`load_run`, and exported with `--format hf`. Rows, each greedy, `--prompt` prompt tokens then
`--new-tokens` new ones per sequence, at each batch size:
- `cache`: the model's own `init_state` / `decode`, prompt prefilled, then one jitted step per
  token (what `menagerie generate` runs; at batch 1 also through `generate.stream` itself);
- `recompute`: one jitted full forward over a fixed [B, prompt + new] buffer per token (the
  sampler before the cache);
- `transformers`: `LlamaForCausalLM.generate(do_sample=False, use_cache=True)` on the export,
  float32, torch using every core.
After one warm-up call each (compilation), the rows run round-robin `--repeats` times; each
reports the median of new tokens / s (B * new tokens / wall time, prefill included) and the
fraction of its tokens equal to transformers' (a one-step model has near-tied logits, so
greedy paths may part after a few tokens on float32 rounding alone). Target
(issue 15): cache >= transformers at batch 1 on CPU. Prints a table and one JSON line; asserts
nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def make_run(folder: Path):
    """A baseline run trained one step (real CLI), loaded back."""
    from menagerie.export.run import load_run
    from menagerie.train.cli import main

    quiet = ["train.steps=1", "train.eval_batches=0", "train.sample_tokens=0"]
    if main(["train", f"run_dir={folder / 'run'}", *quiet]) != 0:
        raise SystemExit("training the benchmark run failed")
    return load_run(folder / "run")


def cached_decoder(model, prompt_BP: np.ndarray, new: int):
    """Greedy decoding with the model's state: a callable returning the new tokens [B, new]."""
    graphdef, params = nnx.split(model)
    b, p = prompt_BP.shape

    @jax.jit
    def prefill(params, tokens, state):
        logits, state = nnx.merge(graphdef, params).decode(tokens, state)
        return jnp.argmax(logits[:, -1], -1).astype(jnp.int32), state

    @jax.jit
    def step(params, token_B, state):
        logits, state = nnx.merge(graphdef, params).decode(token_B[:, None], state)
        return jnp.argmax(logits[:, -1], -1).astype(jnp.int32), state

    def run() -> np.ndarray:
        token, state = prefill(params, jnp.asarray(prompt_BP), model.init_state(b, p + new))
        out = [token]
        for _ in range(new - 1):
            token, state = step(params, token, state)
            out.append(token)
        return np.asarray(jnp.stack(out, 1))

    return run


def recompute_decoder(model, prompt_BP: np.ndarray, new: int):
    """Greedy decoding by a full forward over the whole buffer for every token."""
    graphdef, params = nnx.split(model)
    b, p = prompt_BP.shape

    @jax.jit
    def next_token(params, buf, t):
        logits = nnx.merge(graphdef, params)(buf).logits
        return jax.lax.dynamic_index_in_dim(logits, t - 1, 1, False).argmax(-1).astype(jnp.int32)

    def run() -> np.ndarray:
        buf = jnp.zeros((b, p + new), jnp.int32).at[:, :p].set(prompt_BP)
        for t in range(p, p + new):
            buf = buf.at[:, t].set(next_token(params, buf, t))
        return np.asarray(buf[:, p:])

    return run


def stream_decoder(run_, prompt_BP: np.ndarray, new: int):
    """Batch 1 through `train.generate.stream`, the path `menagerie generate` takes."""
    from menagerie.train.generate import stream

    graphdef, params = nnx.split(run_.model)

    def run() -> np.ndarray:
        ids = stream(
            graphdef,
            params,
            prompt_BP[0],
            max_new_tokens=new,
            window=prompt_BP.shape[1] + new,
            temperature=0.0,
        )
        return np.asarray([list(ids)])

    return run


def hf_decoder(hf_dir: Path, prompt_BP: np.ndarray, new: int):
    """Greedy `generate` of the exported model in transformers (float32, KV cache)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = torch.as_tensor(prompt_BP, dtype=torch.long)

    def run() -> np.ndarray:
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                use_cache=True,
                pad_token_id=0,
            )
        return out[:, prompt_BP.shape[1] :].numpy()

    return run


def timed(fn) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def bench_batch(run_, hf_dir: Path, batch: int, args) -> list[dict]:
    """Every row at one batch size: warm up, then round-robin repeats."""
    rng = np.random.default_rng(batch)
    prompt = rng.integers(0, run_.tokenizer.vocab_size, (batch, args.prompt)).astype(np.int32)
    rows = {
        "cache": cached_decoder(run_.model, prompt, args.new_tokens),
        "recompute": recompute_decoder(run_.model, prompt, args.new_tokens),
        "transformers": hf_decoder(hf_dir, prompt, args.new_tokens),
    }
    if batch == 1:
        rows["cache (generate.stream)"] = stream_decoder(run_, prompt, args.new_tokens)
    outputs = {name: fn() for name, fn in rows.items()}  # warm-up: compile
    times = {name: [] for name in rows}
    for _ in range(args.repeats):
        for name, fn in rows.items():
            seconds, outputs[name] = timed(fn)
            times[name].append(seconds)
    same = {n: round(float((o == outputs["transformers"]).mean()), 3) for n, o in outputs.items()}
    new = batch * args.new_tokens
    return [
        {
            "batch": batch,
            "row": name,
            "tokens_per_s": round(new / statistics.median(t), 1),
            "agrees": same[name],
        }
        for name, t in times.items()
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    from menagerie.export import export_run

    with tempfile.TemporaryDirectory() as tmp:
        run_ = make_run(Path(tmp))
        hf_dir = export_run(run_, "hf", Path(tmp) / "hf")
        rows = [r for b in args.batches.split(",") for r in bench_batch(run_, hf_dir, int(b), args)]
    print(f"{'batch':>5}  {'row':<24} {'new tokens/s':>12}  same tokens as transformers")
    for r in rows:
        print(f"{r['batch']:>5}  {r['row']:<24} {r['tokens_per_s']:>12}  {r['agrees']}")
    by = {(r["batch"], r["row"]): r["tokens_per_s"] for r in rows}
    ratios = {
        f"cache/transformers@{b}": round(by[(b, "cache")] / by[(b, "transformers")], 2)
        for b in {r["batch"] for r in rows}
    }
    print(
        json.dumps(
            {
                "bench": "generate",
                "params": run_.cfg.model.num_params(),
                "rows": rows,
                "ratios": ratios,
            }
        )
    )


if __name__ == "__main__":
    main()
