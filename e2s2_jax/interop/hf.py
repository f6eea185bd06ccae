"""Hugging Face T5 / T5 1.1 checkpoints (config.json + safetensors) to and from this model.

Both directions are lossless (float32 copies and transposes). Pickled PyTorch files are never
read. Command line: `python -m e2s2_jax.interop.hf {import,export} --help`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
from flax import linen as nn

from e2s2_jax.console import console
from e2s2_jax.errors import EXIT_BAD_INPUT
from e2s2_jax.interop import params_io
from e2s2_jax.models.config import FEED_FORWARD_PROJS, T5Config
from e2s2_jax.models.t5 import T5, scan_params, unscan_params

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"

# Tensors HF may store that duplicate or are unused by the model (tied or ignored on load).
_REDUNDANT_TENSORS = {
    "encoder.embed_tokens.weight",
    "decoder.embed_tokens.weight",
    "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",
}


class HFCheckpointError(ValueError):
    """A Hugging Face checkpoint directory that cannot be converted; the message says why."""


# ----------------------------------------------------------------------------- config


def config_from_hf(
    hf_config: dict, source: str = CONFIG_FILE, has_separate_lm_head: bool | None = None
) -> T5Config:
    """T5Config from the fields of an HF T5 `config.json` (dict).

    Older configs say `tie_word_embeddings` (default true) for both tying and scaling; HF 5.x
    writes `scale_decoder_outputs` and always `tie_word_embeddings: true`, leaving tying to
    whether the weights hold a separate `lm_head.weight` (`has_separate_lm_head`).
    """

    def field(name, default=None, required=True):
        if name in hf_config:
            return hf_config[name]
        if required and default is None:
            raise HFCheckpointError(f"{source}: required field {name!r} is missing.")
        return default

    projection = field("feed_forward_proj", "relu")
    if projection not in FEED_FORWARD_PROJS:
        raise HFCheckpointError(
            f"{source}: field 'feed_forward_proj' is {projection!r}; this model supports "
            f"{', '.join(FEED_FORWARD_PROJS)}."
        )
    num_layers = field("num_layers")
    pad_id = field("pad_token_id", 0)
    tie_flag = bool(hf_config.get("tie_word_embeddings", True))  # HF reads absent as true
    tied = tie_flag
    if "scale_decoder_outputs" in hf_config and has_separate_lm_head is not None:
        tied = not has_separate_lm_head
    return T5Config(
        vocab_size=field("vocab_size"),
        d_model=field("d_model"),
        num_heads=field("num_heads"),
        d_kv=field("d_kv"),
        d_ff=field("d_ff"),
        num_encoder_layers=num_layers,
        num_decoder_layers=hf_config.get("num_decoder_layers") or num_layers,
        relative_attention_num_buckets=field("relative_attention_num_buckets", 32),
        relative_attention_max_distance=field("relative_attention_max_distance", 128),
        dropout_rate=float(field("dropout_rate", 0.1)),
        layer_norm_epsilon=float(field("layer_norm_epsilon", 1e-6)),
        feed_forward_proj=projection,
        tie_word_embeddings=tied,
        scale_decoder_outputs=bool(hf_config.get("scale_decoder_outputs", tie_flag)),
        pad_id=pad_id,
        eos_id=field("eos_token_id", 1),
        decoder_start_id=hf_config.get("decoder_start_token_id", pad_id),
    )


def config_to_hf(config: T5Config) -> dict:
    """The `config.json` fields HF's T5ForConditionalGeneration needs for `config`."""
    return {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "is_encoder_decoder": True,
        "vocab_size": config.vocab_size,
        "d_model": config.d_model,
        "num_heads": config.num_heads,
        "d_kv": config.d_kv,
        "d_ff": config.d_ff,
        "num_layers": config.num_encoder_layers,
        "num_decoder_layers": config.num_decoder_layers,
        "relative_attention_num_buckets": config.relative_attention_num_buckets,
        "relative_attention_max_distance": config.relative_attention_max_distance,
        "dropout_rate": config.dropout_rate,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "feed_forward_proj": config.feed_forward_proj,
        "tie_word_embeddings": config.tie_word_embeddings,
        "scale_decoder_outputs": config.scale_decoder_outputs,
        "pad_token_id": config.pad_id,
        "eos_token_id": config.eos_id,
        "decoder_start_token_id": config.decoder_start_id,
        "initializer_factor": 1.0,
        "use_cache": True,
    }


# ----------------------------------------------------------------------------- name mapping

# Kinds of tensor layout change between HF (torch Linear: [out, in]) and this model ([in, out],
# attention kernels included: `[embed, heads * kv]` and `[heads * kv, embed]` as in HF).
_DENSE, _COPY = "dense", "copy"


def _attention(hf_prefix: str, our_prefix: tuple[str, ...]) -> Iterator[tuple]:
    for hf_name, ours in (
        ("q", "query"),
        ("k", "key"),
        ("v", "value"),
        ("o", "out"),
    ):
        yield f"{hf_prefix}.{hf_name}.weight", (*our_prefix, ours, "kernel"), _DENSE


def _mlp(config: T5Config, hf_prefix: str, our_prefix: tuple[str, ...]) -> Iterator[tuple]:
    names = ("wi_0", "wi_1", "wo") if config.is_gated else ("wi", "wo")
    for name in names:
        yield (
            f"{hf_prefix}.DenseReluDense.{name}.weight",
            (*our_prefix, "mlp", name, "kernel"),
            _DENSE,
        )


def tensor_mapping(config: T5Config) -> list[tuple[str, tuple[str, ...], str]]:
    """`(hf_name, our_param_path, layout_kind)` for every parameter (unscanned layout)."""
    mapping = [("shared.weight", ("token_embedder", "embedding"), _COPY)]
    for stack, num_layers in (
        ("encoder", config.num_encoder_layers),
        ("decoder", config.num_decoder_layers),
    ):
        mapping.append(
            (
                f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                (stack, "relpos_bias", "rel_embedding"),
                _COPY,
            )
        )
        mapping.append((f"{stack}.final_layer_norm.weight", (stack, "final_norm", "scale"), _COPY))
        for i in range(num_layers):
            hf, ours = f"{stack}.block.{i}.layer", (stack, f"layers_{i}")
            if stack == "encoder":
                mapping += _attention(f"{hf}.0.SelfAttention", (*ours, "attention"))
                mapping.append(
                    (f"{hf}.0.layer_norm.weight", (*ours, "pre_attention_norm", "scale"), _COPY)
                )
                mapping += _mlp(config, f"{hf}.1", ours)
                mapping.append(
                    (f"{hf}.1.layer_norm.weight", (*ours, "pre_mlp_norm", "scale"), _COPY)
                )
            else:
                mapping += _attention(f"{hf}.0.SelfAttention", (*ours, "self_attention"))
                mapping.append(
                    (
                        f"{hf}.0.layer_norm.weight",
                        (*ours, "pre_self_attention_norm", "scale"),
                        _COPY,
                    )
                )
                mapping += _attention(
                    f"{hf}.1.EncDecAttention", (*ours, "encoder_decoder_attention")
                )
                mapping.append(
                    (
                        f"{hf}.1.layer_norm.weight",
                        (*ours, "pre_cross_attention_norm", "scale"),
                        _COPY,
                    )
                )
                mapping += _mlp(config, f"{hf}.2", ours)
                mapping.append(
                    (f"{hf}.2.layer_norm.weight", (*ours, "pre_mlp_norm", "scale"), _COPY)
                )
    if not config.tie_word_embeddings:
        mapping.append(("lm_head.weight", ("output_layer", "logits_dense", "kernel"), _DENSE))
    return mapping


def _hf_shape(our_shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
    return our_shape[::-1] if kind == _DENSE else our_shape


def _to_ours(tensor: np.ndarray, kind: str) -> np.ndarray:
    return np.ascontiguousarray(tensor.T) if kind == _DENSE else tensor


def _to_hf(array: np.ndarray, kind: str) -> np.ndarray:
    return np.ascontiguousarray(array.T if kind == _DENSE else array)


def _param_shapes(config: T5Config) -> dict:
    """Unscanned parameter shapes of `config`'s model, without allocating them."""
    model = T5(T5Config(**{**config.__dict__, "scan_layers": False}))
    tokens = jnp.ones((1, 1), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens, tokens)
    return nn.unbox(shapes["params"])


def _get(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


# ----------------------------------------------------------------------------- import / export


def _weight_files(hf_dir: str) -> list[str]:
    index_path = os.path.join(hf_dir, WEIGHTS_INDEX_FILE)
    single_path = os.path.join(hf_dir, WEIGHTS_FILE)
    if os.path.exists(index_path):
        with open(index_path) as f:
            try:
                weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise HFCheckpointError(f"{index_path}: not a valid index ({e}).") from e
        return sorted({os.path.join(hf_dir, name) for name in weight_map.values()})
    if os.path.exists(single_path):
        return [single_path]
    pickled = [
        n for n in ("pytorch_model.bin", "tf_model.h5") if os.path.exists(os.path.join(hf_dir, n))
    ]
    hint = (
        (
            f" Found {pickled[0]}, which is never unpickled here: save the model with "
            "`save_pretrained(..., safe_serialization=True)` first."
        )
        if pickled
        else ""
    )
    raise HFCheckpointError(f"{single_path}: missing (nor {WEIGHTS_INDEX_FILE}).{hint}")


def _read_tensors(hf_dir: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    tensors, sources = {}, {}
    for path in _weight_files(hf_dir):
        if not os.path.exists(path):
            raise HFCheckpointError(f"{path}: listed in {WEIGHTS_INDEX_FILE} but missing.")
        try:
            with safetensors.safe_open(path, framework="flax") as f:
                for name in f.keys():
                    tensors[name] = np.asarray(f.get_tensor(name), dtype=np.float32)
                    sources[name] = path
        except (OSError, safetensors.SafetensorError) as e:
            raise HFCheckpointError(f"{path}: not a readable safetensors file ({e}).") from e
    return tensors, sources


def load_hf_config(hf_dir: str, has_separate_lm_head: bool | None = None) -> T5Config:
    """T5Config of an HF checkpoint directory."""
    hf_config, path = _read_config_json(hf_dir)
    return config_from_hf(hf_config, path, has_separate_lm_head)


def _read_config_json(hf_dir: str) -> tuple[dict, str]:
    """`(fields, path)` of the directory's config.json."""
    path = os.path.join(hf_dir, CONFIG_FILE)
    if not os.path.exists(path):
        raise HFCheckpointError(f"{path}: missing; an HF T5 directory has config.json.")
    with open(path) as f:
        try:
            hf_config = json.load(f)
        except json.JSONDecodeError as e:
            raise HFCheckpointError(f"{path}: not valid JSON ({e}).") from e
    return hf_config, path


def import_hf(
    hf_dir: str, *, scan_layers: bool = False, **config_overrides
) -> tuple[T5Config, dict]:
    """Reads an HF T5 directory; returns `(config, params)` (float32 numpy params)."""
    hf_config, config_path = _read_config_json(hf_dir)
    config_from_hf(hf_config, config_path)  # Fail on a bad config before reading weights.
    tensors, sources = _read_tensors(hf_dir)
    if "shared.weight" not in tensors and "encoder.embed_tokens.weight" in tensors:
        tensors["shared.weight"] = tensors["encoder.embed_tokens.weight"]
    separate_head = "lm_head.weight" in tensors and not (
        "shared.weight" in tensors
        and tensors["lm_head.weight"].shape == tensors["shared.weight"].shape
        and np.array_equal(tensors["lm_head.weight"], tensors["shared.weight"])
    )
    config = config_from_hf(hf_config, config_path, separate_head)
    config = T5Config(**{**config.__dict__, **config_overrides, "scan_layers": False})
    if not config.tie_word_embeddings and "lm_head.weight" not in tensors:
        raise HFCheckpointError(
            f"{os.path.join(hf_dir, CONFIG_FILE)}: tie_word_embeddings is false but the weights "
            "have no 'lm_head.weight'; set tie_word_embeddings true or add the tensor."
        )
    shapes = _param_shapes(config)
    params: dict = {}
    used = set()
    for hf_name, path, kind in tensor_mapping(config):
        our_shape = tuple(_get(shapes, path).shape)
        expected = _hf_shape(our_shape, kind)
        if hf_name not in tensors:
            raise HFCheckpointError(
                f"{hf_dir}: tensor {hf_name!r} (shape {expected}) is missing from the weights."
            )
        tensor = tensors[hf_name]
        if tuple(tensor.shape) != expected:
            raise HFCheckpointError(
                f"{sources.get(hf_name, hf_dir)}: tensor {hf_name!r} has shape "
                f"{tuple(tensor.shape)}, but config.json implies {expected}; the config and the "
                "weights disagree."
            )
        _set(params, path, _to_ours(tensor, kind))
        used.add(hf_name)
    unused = sorted(set(tensors) - used - _REDUNDANT_TENSORS - {"lm_head.weight"})
    if unused:
        log.warning(
            "%s: %d tensors not used by this model: %s", hf_dir, len(unused), ", ".join(unused[:10])
        )
    if scan_layers:
        params = scan_params(params)
        config = T5Config(**{**config.__dict__, "scan_layers": True})
    return config, params


def export_hf(config: T5Config, params: dict, hf_dir: str) -> None:
    """Writes `config.json` and `model.safetensors` that HF's T5ForConditionalGeneration loads."""
    params = nn.unbox(params)
    if config.scan_layers or "layers" in params.get("encoder", {}):
        params = unscan_params(params)
    tensors = {}
    for hf_name, path, kind in tensor_mapping(config):
        try:
            array = np.asarray(_get(params, path), dtype=np.float32)
        except KeyError as e:
            raise ValueError(f"params lack {'/'.join(path)} (needed for {hf_name}).") from e
        tensors[hf_name] = _to_hf(array, kind)
    os.makedirs(hf_dir, exist_ok=True)
    with open(os.path.join(hf_dir, CONFIG_FILE), "w") as f:
        json.dump(config_to_hf(config), f, indent=2)
    safetensors.numpy.save_file(
        tensors, os.path.join(hf_dir, WEIGHTS_FILE), metadata={"format": "pt"}
    )


# ----------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    """The conversion command line; returns the exit status (2 on bad input)."""
    parser = argparse.ArgumentParser(
        prog="python -m e2s2_jax.interop.hf",
        description="Convert T5 checkpoints between Hugging Face (config.json + safetensors) "
        "and this project's params directory (Orbax params + t5_config.json).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    imp = commands.add_parser("import", help="HF directory -> params directory")
    imp.add_argument("--hf_dir", required=True, help="directory with config.json and safetensors")
    imp.add_argument("--output_dir", required=True, help="params directory to write")
    imp.add_argument("--scan_layers", action="store_true", help="store params in nn.scan layout")
    exp = commands.add_parser("export", help="params directory -> HF directory")
    exp.add_argument("--params_dir", required=True, help="params directory written by import")
    exp.add_argument("--hf_dir", required=True, help="HF directory to write")
    args = parser.parse_args(argv)
    try:
        if args.command == "import":
            config, params = import_hf(args.hf_dir, scan_layers=args.scan_layers)
            params_io.save_params(args.output_dir, config, params)
            console.info(f"imported {args.hf_dir} -> {args.output_dir}")
        else:
            config, params = params_io.load_params(args.params_dir)
            export_hf(config, params, args.hf_dir)
            console.info(f"exported {args.params_dir} -> {args.hf_dir}")
    except (ValueError, OSError, RuntimeError) as error:
        # The conversion's errors name the file and what is wrong with it (HFCheckpointError,
        # CheckpointError, a missing or unreadable file): one line, no traceback, on stderr
        # from every process, as `main` reports its errors (the exit reason, not a log line).
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
