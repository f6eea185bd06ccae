"""SSR generation throughput: this project's batched nucleus sampling (KV cache, jitted) against
Hugging Face `transformers`' `generate` on the same generator exported to HF, in one run.
Prints one JSON object.

Both fill the same SSR examples (windows of the bundled validation text with spans masked by the
SSR sampler) in the same batches, with top-p 0.9, temperature 1, the same decode budget (3x the
masked sentencepieces + sentinels, rounded up) and early stop when every row has emitted eos.
Reported: generated tokens/s (eos included, padding not) and well-formed filled spans/s (fills
of examples whose generation passes the job's validation). Each side runs one untimed batch
first (compilation / warm-up); then `--rounds` rounds over all batches, the two alternating;
medians. A greedy cross-check reports the fraction of rows where both emit the same tokens.

  PYTHONPATH=. python benchmarks/ssr_generate.py --generator_dir /tmp/generator_run \
      --gin_file gin/models/t5_1_1_tiny.gin --batch 32 --examples 256
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._common import hf_model_from_params, load_model, rows_identical
from e2s2_jax.data.corpus import BUNDLED_VALIDATION_FILES
from e2s2_jax.data.text_source import read_text_documents
from e2s2_jax.data.vocab import get_vocabulary
from e2s2_jax.decoding import DecodeConfig, make_predict_fn
from e2s2_jax.ssr import job


def _examples(num_examples, max_words, vocabulary, eos_id):
    documents = read_text_documents(BUNDLED_VALIDATION_FILES)
    pairs = job.iterate_examples(documents, max_words, num_examples)
    return [job.make_example(i, text, vocabulary, 0, eos_id) for i, text in pairs]


def _batches(examples, batch, eos_id):
    length = max(len(e.input_ids) for e in examples)
    out = []
    for start in range(0, len(examples) - batch + 1, batch):
        rows = examples[start : start + batch]
        inputs = np.zeros((batch, length), np.int32)
        for r, e in enumerate(rows):
            inputs[r, : len(e.input_ids)] = e.input_ids
        out.append((rows, inputs))
    return out


def _count(rows, tokens, vocabulary, eos_id):
    """(generated tokens up to and including eos, well-formed filled spans)."""
    generated = spans = 0
    for example, row in zip(rows, tokens, strict=True):
        row = [int(t) for t in row]
        generated += row.index(eos_id) + 1 if eos_id in row else len(row)
        parsed = job.parse_fills(
            np.asarray(row), np.zeros(len(row)), example.num_spans, vocabulary, eos_id
        )
        if not isinstance(parsed, str):
            spans += example.num_spans
    return generated, spans


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--generator_dir", required=True)
    parser.add_argument("--gin_file", action="append", default=[])
    parser.add_argument("--gin_binding", action="append", default=[])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--max_words", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--torch_threads", type=int, default=os.cpu_count())
    args = parser.parse_args()

    import torch

    from e2s2_jax.training import partitioning
    from e2s2_jax.training.checkpoints import restore_params

    torch.set_num_threads(args.torch_threads)
    model = load_model(args.gin_file or ["gin/models/t5_1_1_tiny.gin"], args.gin_binding)
    cfg = model.config
    mesh = partitioning.create_mesh(-1, 1, 1)
    params = restore_params(args.generator_dir, model, mesh)
    vocabulary = get_vocabulary()
    examples = _examples(args.examples, args.max_words, vocabulary, cfg.eos_id)
    budget = max(job.decode_budget(e, 3.0) for e in examples)
    budget = int(math.ceil(budget / 32) * 32)
    batches = _batches(examples, args.batch, cfg.eos_id)

    hf_model = hf_model_from_params(cfg, params, prefix="ssr-bench-hf-")

    sample = DecodeConfig(method="sample", max_decode_length=budget, top_p=0.9, temperature=1.0)
    predict = make_predict_fn(model, sample)
    rng = jax.random.key(0)

    def ours(index, inputs):
        result = predict(params, jnp.asarray(inputs), jax.random.fold_in(rng, index))
        return np.asarray(jax.block_until_ready(result.tokens))

    def theirs(index, inputs, do_sample=True):
        torch.manual_seed(index)
        ids = torch.from_numpy(inputs.astype(np.int64))
        with torch.no_grad():
            out = hf_model.generate(
                input_ids=ids,
                attention_mask=(ids != 0).long(),
                do_sample=do_sample,
                top_p=0.9 if do_sample else None,
                top_k=0 if do_sample else None,
                temperature=1.0 if do_sample else None,
                max_new_tokens=budget,
                decoder_start_token_id=cfg.decoder_start_id,
                eos_token_id=cfg.eos_id,
                pad_token_id=cfg.pad_id,
            )
        return out[:, 1:].numpy()  # drop the decoder start token

    ours(0, batches[0][1])  # compile
    theirs(0, batches[0][1])  # warm up
    timings = {"jax": [], "hf": []}
    counts = {"jax": [], "hf": []}
    for _ in range(args.rounds):
        for name, fn in (("jax", ours), ("hf", theirs)):
            start = time.perf_counter()
            outputs = [fn(i, inputs) for i, (_, inputs) in enumerate(batches)]
            timings[name].append(time.perf_counter() - start)
            total = np.sum(
                [
                    _count(rows, out, vocabulary, cfg.eos_id)
                    for (rows, _), out in zip(batches, outputs, strict=True)
                ],
                axis=0,
            )
            counts[name].append(total.tolist())

    greedy = make_predict_fn(model, DecodeConfig(method="greedy", max_decode_length=budget))
    greedy_ours = np.asarray(greedy(params, jnp.asarray(batches[0][1])).tokens)
    greedy_hf = theirs(0, batches[0][1], do_sample=False)
    same = rows_identical(greedy_ours, greedy_hf)

    result = {"device": jax.devices()[0].device_kind, "platform": platform.processor()}
    result.update(
        batch=args.batch,
        examples=len(batches) * args.batch,
        decode_budget=budget,
        input_length=int(batches[0][1].shape[1]),
        greedy_rows_identical=float(same),
        torch_threads=args.torch_threads,
    )
    for name in ("jax", "hf"):
        seconds = statistics.median(timings[name])
        tokens = statistics.median(c[0] for c in counts[name])
        spans = statistics.median(c[1] for c in counts[name])
        result[name] = {
            "seconds": round(seconds, 3),
            "rounds_seconds": [round(s, 3) for s in timings[name]],
            "generated_tokens_per_s": round(tokens / seconds, 1),
            "filled_spans_per_s": round(spans / seconds, 1),
            "well_formed_span_fraction": round(
                spans / sum(e.num_spans for rows, _ in batches for e in rows), 3
            ),
        }
    result["speedup_tokens_per_s"] = round(
        result["jax"]["generated_tokens_per_s"] / result["hf"]["generated_tokens_per_s"], 2
    )
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
