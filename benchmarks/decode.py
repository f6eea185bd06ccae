"""Greedy and beam-search decoding throughput: this project's jitted decoding (KV cache) against
Hugging Face `transformers`' `generate` on the same weights exported to HF, in one run.
Prints one JSON object.

Same weights (random init, or `--params_dir`; exported with `export_hf` and loaded with
`T5ForConditionalGeneration.from_pretrained`), same random input tokens (`--batch` rows of
`--input_length`, no padding), same `--new_tokens`, same beam settings (`--num_beams`,
`--length_penalty`; HF's `early_stopping=False` is ours `stop_bound="current_length"`). Both
sides do fixed work: no eos can stop a row (ours is given an eos id outside the vocabulary, HF
`eos_token_id=None`), so every row generates exactly `--new_tokens` tokens. Tokens/s counts
generated tokens, `batch x new_tokens`, for greedy and for beam search alike (the returned best
sequence per row; the 4 beams' work is not counted 4 times). The time is end to end: encoder,
cross-attention projections and every decoding step.

Ours is compiled before timing (compile seconds reported); HF runs once untimed. Then `--rounds`
rounds, ours and HF alternating within each round; medians, spread and all rounds, and the
ratio (HF seconds / ours seconds = ours tokens/s / HF tokens/s) of the medians and per round.
A cross-check reports the fraction of rows whose tokens are identical on both sides (greedy and
the best beam). A breakdown times each side's encoder alone, and derives the decoding steps'
share as the rest. `--new_tokens` is 32 by default so that a T5 1.1 small run (three rounds of
HF beam search take from half a minute to several minutes on 2 shared cores) stays near ten
minutes. Torch's per-op thread barriers slow down far more than XLA's thread pool when other
processes share the cores: note the load averages reported and compare the rounds' spread.

  PYTHONPATH=. python benchmarks/decode.py --gin_file gin/models/t5_1_1_tiny.gin
  PYTHONPATH=. python benchmarks/decode.py --gin_file gin/models/t5_1_1_small.gin --new_tokens 32
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._common import (
    alternate,
    environment,
    hf_model_from_params,
    load_model,
    rows_identical,
    summary,
)
from e2s2_jax.decoding import DecodeConfig, make_predict_fn
from e2s2_jax.models.t5 import T5

# The project's goal: ours at least this many times HF's generated tokens/s.
TARGETS = {"greedy": 2.0, "beam": 1.5}


def _params(model: T5, params_dir: str | None, seed: int):
    if params_dir:
        from e2s2_jax.training import partitioning
        from e2s2_jax.training.checkpoints import restore_params

        return restore_params(params_dir, model, partitioning.create_mesh(-1, 1, 1))
    import flax.linen as nn

    tokens = jnp.ones((1, 8), jnp.int32)
    return nn.unbox(jax.jit(model.init)(jax.random.key(seed), tokens, tokens))["params"]


def _ratio(hf_seconds: list[float], our_seconds: list[float]) -> dict:
    per_round = [h / o for h, o in zip(hf_seconds, our_seconds, strict=True)]
    return {
        "of_medians": round(statistics.median(hf_seconds) / statistics.median(our_seconds), 3),
        "per_round": [round(r, 3) for r in per_round],
        "per_round_min": round(min(per_round), 3),
        "per_round_max": round(max(per_round), 3),
    }


def _race(method: str, args, model: T5, params, inputs: np.ndarray, hf_generate) -> dict:
    """Compiles ours, warms HF up, then alternates the two for `args.rounds` rounds; returns
    the method's section of the report. Outputs are `[batch, new_tokens]` (the best beam)."""
    decode_config = DecodeConfig(
        method,
        max_decode_length=args.new_tokens,
        num_beams=args.num_beams,
        length_penalty=args.length_penalty,
    )
    device_inputs = jnp.asarray(inputs)
    start = time.perf_counter()
    compiled = make_predict_fn(model, decode_config).lower(params, device_inputs).compile()
    compile_seconds = time.perf_counter() - start
    num_beams = args.num_beams if method == "beam" else 1
    outputs = {}

    def ours():
        tokens = np.asarray(compiled(params, device_inputs).tokens)
        outputs["ours"] = tokens[:, 0] if method == "beam" else tokens

    def theirs():
        outputs["hf"] = hf_generate(num_beams)

    ours()
    theirs()  # Warm-up.
    seconds = alternate({"ours": ours, "hf": theirs}, args.rounds)
    for name, tokens in outputs.items():
        if tokens.shape != (args.batch, args.new_tokens):
            raise RuntimeError(f"{method}/{name} returned {tokens.shape}: not full length.")
    generated_tokens = args.batch * args.new_tokens
    speedup = _ratio(seconds["hf"], seconds["ours"])
    return {
        "ours": {"compile_s": round(compile_seconds, 2), **summary(seconds["ours"])},
        "hf": summary(seconds["hf"]),
        "ours_tokens_per_s": round(generated_tokens / statistics.median(seconds["ours"]), 1),
        "hf_tokens_per_s": round(generated_tokens / statistics.median(seconds["hf"]), 1),
        "speedup": speedup,
        "target_speedup": TARGETS.get(method),
        "meets_target": method in TARGETS and speedup["of_medians"] >= TARGETS[method],
        "rows_identical": rows_identical(outputs["ours"], outputs["hf"]),
        "tokens_identical": float(np.mean(outputs["ours"] == outputs["hf"])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gin_file", action="append", default=[])
    parser.add_argument("--gin_binding", action="append", default=[])
    parser.add_argument("--params_dir", default=None, help="trained params; default random")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--input_length", type=int, default=512)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--num_beams", type=int, default=4)
    parser.add_argument("--length_penalty", type=float, default=1.0)
    parser.add_argument("--methods", default="greedy,beam")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    # XLA's CPU backend uses one thread per core it may run on; torch gets as many.
    parser.add_argument("--torch_threads", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()

    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.torch_threads)
    gin_files = args.gin_file or ["gin/models/t5_1_1_tiny.gin"]
    model = load_model(gin_files, args.gin_binding)
    cfg = model.config
    params = _params(model, args.params_dir, args.seed)
    hf_model = hf_model_from_params(cfg, params, prefix="decode-bench-hf-")
    hf_model.generation_config.eos_token_id = None  # No row stops early.
    # The same weights; an eos id no logit can select, so every row runs `new_tokens` steps.
    fixed_length_model = T5(dataclasses.replace(cfg, eos_id=cfg.vocab_size))

    inputs = np.random.default_rng(args.seed).integers(
        2, cfg.vocab_size, (args.batch, args.input_length), dtype=np.int32
    )
    input_ids = torch.from_numpy(inputs.astype(np.int64))
    device_inputs = jnp.asarray(inputs)
    generated_tokens = args.batch * args.new_tokens

    def hf_generate(num_beams: int) -> np.ndarray:
        with torch.no_grad():
            out = hf_model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=False,
                num_beams=num_beams,
                length_penalty=args.length_penalty,
                early_stopping=False,
                max_new_tokens=args.new_tokens,
                decoder_start_token_id=cfg.decoder_start_id,
                pad_token_id=cfg.pad_id,
                use_cache=True,
            )
        return out[:, 1:].numpy()  # Drop the decoder start token.

    report = {"benchmark": "decode", **environment(args.torch_threads)}
    report.update(
        gin_files=gin_files,
        params="random init" if args.params_dir is None else args.params_dir,
        batch=args.batch,
        input_length=args.input_length,
        new_tokens=args.new_tokens,
        num_beams=args.num_beams,
        length_penalty=args.length_penalty,
        rounds=args.rounds,
        generated_tokens_per_call=generated_tokens,
    )

    for method in args.methods.split(","):
        report[method] = _race(method, args, fixed_length_model, params, inputs, hf_generate)

    # Where the time goes: each side's encoder alone; the decoding steps are the rest.
    encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=T5.encode).encoded)
    jax.block_until_ready(encode(params, device_inputs))
    hf_encoder = hf_model.get_encoder()

    def hf_encode():
        with torch.no_grad():
            return hf_encoder(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))

    hf_encode()
    encoder_seconds = alternate(
        {"ours": lambda: np.asarray(encode(params, device_inputs)), "hf": hf_encode}, args.rounds
    )
    breakdown = {
        name: {"encoder_median_s": round(statistics.median(s), 4)}
        for name, s in encoder_seconds.items()
    }
    for method in args.methods.split(","):
        for name in ("ours", "hf"):
            rest = report[method][name]["median_s"] - breakdown[name]["encoder_median_s"]
            breakdown[name][f"{method}_decoding_ms_per_step"] = round(
                1000 * rest / args.new_tokens, 2
            )
    report["breakdown"] = breakdown
    report["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
