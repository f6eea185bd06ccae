"""Tiny random Hugging Face T5 models (PyTorch CPU), saved as safetensors directories."""

from __future__ import annotations

import numpy as np
import torch
import transformers

VOCAB = 97


def make_hf_t5(directory: str, version: str, seed: int = 0):
    """Builds, saves and returns a seeded random HF T5 ("1.1": gated-GELU, untied head;
    "1.0": ReLU, tied and scaled head). Small buckets/distance so long-range buckets occur."""
    torch.manual_seed(seed)
    t5_1_1 = version == "1.1"
    config = transformers.T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        num_heads=4,
        d_ff=48,
        num_layers=2,
        num_decoder_layers=3,
        feed_forward_proj="gated-gelu" if t5_1_1 else "relu",
        tie_word_embeddings=not t5_1_1,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        dropout_rate=0.0,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
    )
    model = transformers.T5ForConditionalGeneration(config).eval()
    with torch.no_grad():
        if t5_1_1:  # A separate output projection, as in real T5 1.1 checkpoints.
            model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 32) * 0.3)
        # Larger position biases than the default init, so that positions matter.
        for stack in (model.encoder, model.decoder):
            bias = stack.block[0].layer[0].SelfAttention.relative_attention_bias.weight
            bias.copy_(torch.randn_like(bias))
    model.save_pretrained(directory)
    return model


def random_batch(seed: int, batch: int = 3, enc_len: int = 30, dec_len: int = 25):
    """Encoder tokens with padded rows, decoder inputs starting with the start token 0."""
    rng = np.random.RandomState(seed)
    encoder_tokens = rng.randint(2, VOCAB, (batch, enc_len)).astype(np.int32)
    encoder_tokens[1, 18:] = 0
    encoder_tokens[2, 5:] = 0
    decoder_tokens = rng.randint(2, VOCAB, (batch, dec_len)).astype(np.int32)
    decoder_tokens[:, 0] = 0
    return encoder_tokens, decoder_tokens


def hf_logits(model, encoder_tokens: np.ndarray, decoder_tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(encoder_tokens, dtype=torch.long),
            attention_mask=torch.tensor(encoder_tokens != 0, dtype=torch.long),
            decoder_input_ids=torch.tensor(decoder_tokens, dtype=torch.long),
        )
    return out.logits.numpy()
