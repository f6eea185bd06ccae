"""Hugging Face interop: numerical parity with transformers' PyTorch T5, both directions."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from hf_fixtures import hf_logits, make_hf_t5, random_batch

from e2s2_jax.decoding import DecodeConfig, make_predict_fn
from e2s2_jax.interop import params_io
from e2s2_jax.interop.hf import HFCheckpointError, export_hf, import_hf, main
from e2s2_jax.models.attention import relative_position_bucket_table
from e2s2_jax.models.t5 import T5


def assert_close(ours, reference, tol=1e-5):
    """Equal within `tol` relative to the reference's scale (float32 parity)."""
    ours, reference = np.asarray(ours), np.asarray(reference)
    scale = np.max(np.abs(reference))
    np.testing.assert_allclose(ours, reference, rtol=tol, atol=tol * scale)


@pytest.fixture(scope="module", params=["1.1", "1.0"])
def hf_model(request, tmp_path_factory):
    directory = str(tmp_path_factory.mktemp(f"hf_t5_{request.param}"))
    model = make_hf_t5(directory, request.param)
    return request.param, directory, model


def test_relative_position_buckets_match_hf():
    for bidirectional in (True, False):
        for buckets, distance in ((32, 128), (8, 20)):
            table = relative_position_bucket_table(600, 600, bidirectional, buckets, distance)
            relative = torch.arange(-600, 601)
            reference = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
                relative, bidirectional=bidirectional, num_buckets=buckets, max_distance=distance
            )
            np.testing.assert_array_equal(table, reference.numpy())


def test_import_matches_encoder_outputs_and_logits(hf_model):
    version, directory, model = hf_model
    config, params = import_hf(directory)
    assert config.feed_forward_proj == ("gated-gelu" if version == "1.1" else "relu")
    assert config.tie_word_embeddings == (version == "1.0")
    encoder_tokens, decoder_tokens = random_batch(seed=1)
    ours_model = T5(config)

    encoded = ours_model.apply(
        {"params": params}, jnp.asarray(encoder_tokens), method=T5.encode
    ).encoded
    with torch.no_grad():
        reference = model.encoder(
            input_ids=torch.tensor(encoder_tokens, dtype=torch.long),
            attention_mask=torch.tensor(encoder_tokens != 0, dtype=torch.long),
        ).last_hidden_state.numpy()
    valid = encoder_tokens != 0  # Padded positions are undefined in both.
    assert_close(np.asarray(encoded)[valid], reference[valid])

    logits = ours_model.apply(
        {"params": params}, jnp.asarray(encoder_tokens), jnp.asarray(decoder_tokens)
    )
    assert_close(logits, hf_logits(model, encoder_tokens, decoder_tokens))


def test_scanned_import_gives_same_logits(hf_model):
    _, directory, model = hf_model
    config, params = import_hf(directory, scan_layers=True)
    assert config.scan_layers and params["encoder"]["layers"]["mlp"]["wo"]["kernel"].shape[0] == 2
    encoder_tokens, decoder_tokens = random_batch(seed=2)
    logits = T5(config).apply(
        {"params": params}, jnp.asarray(encoder_tokens), jnp.asarray(decoder_tokens)
    )
    assert_close(logits, hf_logits(model, encoder_tokens, decoder_tokens))


def test_export_round_trip(hf_model, tmp_path):
    _, directory, model = hf_model
    config, params = import_hf(directory)
    export_dir = str(tmp_path / "exported")
    export_hf(config, params, export_dir)
    # Lossless: importing the export gives bitwise the same params.
    config_again, params_again = import_hf(export_dir)
    assert config_again == config
    jax.tree.map(np.testing.assert_array_equal, params, params_again)
    # transformers loads it and reproduces the original model's logits.
    reloaded = transformers.T5ForConditionalGeneration.from_pretrained(export_dir).eval()
    encoder_tokens, decoder_tokens = random_batch(seed=3)
    assert_close(
        hf_logits(reloaded, encoder_tokens, decoder_tokens),
        hf_logits(model, encoder_tokens, decoder_tokens),
    )
    # Exporting scanned params is the same as exporting unscanned ones.
    scanned_config, scanned = import_hf(directory, scan_layers=True)
    export_hf(scanned_config, scanned, str(tmp_path / "from_scan"))
    _, params_from_scan = import_hf(str(tmp_path / "from_scan"))
    jax.tree.map(np.testing.assert_array_equal, params, params_from_scan)


def _hf_generate(model, encoder_tokens, **kwargs):
    # use_cache=False: HF's cache assumes num_decoder_layers == num_layers, which ours is not.
    with torch.no_grad():
        return model.generate(
            input_ids=torch.tensor(encoder_tokens, dtype=torch.long),
            attention_mask=torch.tensor(encoder_tokens != 0, dtype=torch.long),
            decoder_start_token_id=0,
            eos_token_id=1,
            pad_token_id=0,
            use_cache=False,
            **kwargs,
        ).numpy()[:, 1:]  # Drop the start token.


def _pad_to(tokens: np.ndarray, length: int) -> np.ndarray:
    """HF's rows padded to `length`, with everything after the first eos set to pad (0), as
    ours are (HF fills finished beams with its own filler)."""
    tokens = np.pad(tokens, ((0, 0), (0, length - tokens.shape[1])))
    after_eos = np.cumsum(np.cumsum(tokens == 1, axis=1), axis=1) > 1
    return np.where(after_eos, 0, tokens)


def test_greedy_matches_hf_generate(hf_model):
    _, directory, model = hf_model
    config, params = import_hf(directory)
    encoder_tokens, _ = random_batch(seed=4, batch=4)
    length = 12
    ours = make_predict_fn(T5(config), DecodeConfig("greedy", max_decode_length=length))(
        params, jnp.asarray(encoder_tokens)
    )
    reference = _hf_generate(
        model, encoder_tokens, do_sample=False, max_new_tokens=length, min_new_tokens=0
    )
    np.testing.assert_array_equal(np.asarray(ours.tokens), _pad_to(reference, length))


def test_beam_search_matches_hf_generate(hf_model):
    _, directory, model = hf_model
    config, params = import_hf(directory)
    encoder_tokens, _ = random_batch(seed=5, batch=8)
    length = 10
    for length_penalty in (1.0, 0.6):
        ours = make_predict_fn(
            T5(config),
            DecodeConfig(
                "beam", max_decode_length=length, num_beams=4, length_penalty=length_penalty
            ),
        )(params, jnp.asarray(encoder_tokens))
        reference = _hf_generate(
            model,
            encoder_tokens,
            do_sample=False,
            num_beams=4,
            max_new_tokens=length,
            length_penalty=length_penalty,
            early_stopping=False,
        )
        np.testing.assert_array_equal(np.asarray(ours.tokens[:, 0]), _pad_to(reference, length))


def test_command_line_round_trip(hf_model, tmp_path, capsys):
    _, directory, model = hf_model
    main(["import", "--hf_dir", directory, "--output_dir", str(tmp_path / "params")])
    config, params = params_io.load_params(str(tmp_path / "params"))
    main(["export", "--params_dir", str(tmp_path / "params"), "--hf_dir", str(tmp_path / "hf")])
    _, params_again = import_hf(str(tmp_path / "hf"))
    jax.tree.map(np.testing.assert_array_equal, params, params_again)
    assert "exported" in capsys.readouterr().out


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("hf_good"))
    make_hf_t5(directory, "1.1")
    return directory


def _copy(src, dst):
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        with open(os.path.join(src, name), "rb") as f, open(os.path.join(dst, name), "wb") as g:
            g.write(f.read())


def _edit_config(directory, **fields):
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(fields)
    with open(path, "w") as f:
        json.dump(config, f)


def test_missing_config_names_the_file(good_dir, tmp_path):
    _copy(good_dir, tmp_path)
    os.remove(tmp_path / "config.json")
    with pytest.raises(HFCheckpointError, match=r"config\.json: missing"):
        import_hf(str(tmp_path))


def test_missing_weights_refuses_pickle(good_dir, tmp_path):
    _copy(good_dir, tmp_path)
    os.remove(tmp_path / "model.safetensors")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not to be unpickled")
    with pytest.raises(HFCheckpointError, match=r"model\.safetensors: missing.*never unpickled"):
        import_hf(str(tmp_path))


def test_wrong_shape_names_tensor_and_file(good_dir, tmp_path):
    _copy(good_dir, tmp_path)
    _edit_config(tmp_path, d_ff=64)
    with pytest.raises(
        HFCheckpointError,
        match=r"model\.safetensors: tensor '.*DenseReluDense"
        r".*wi_0\.weight' has shape \(48, 32\)",
    ):
        import_hf(str(tmp_path))


def test_unknown_feed_forward_proj_names_the_field(good_dir, tmp_path):
    _copy(good_dir, tmp_path)
    _edit_config(tmp_path, feed_forward_proj="gated-silu")
    with pytest.raises(
        HFCheckpointError,
        match=r"config\.json: field 'feed_forward_proj' is "
        r"'gated-silu'",
    ):
        import_hf(str(tmp_path))


def test_truncated_weights_file(good_dir, tmp_path):
    _copy(good_dir, tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(HFCheckpointError, match=r"model\.safetensors: not a readable"):
        import_hf(str(tmp_path))
