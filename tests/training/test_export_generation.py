"""training/export_generation.py: the graphs of a generation bundle, as GenerationSpec says, and
their agreement with PyTorch token by token through the caches (fp32, and fp16-stored weights)."""

from __future__ import annotations

import copy
import shutil

import numpy as np
import onnx
import pytest
import torch

from app.generation import DecoderGraphs
from app.manifest import read_manifest, write_manifest
from tests.tiny import tiny_generation_bundle_dir, tiny_generation_model, tiny_generation_tokenizer
from training.export_generation import add_kv_fill_from, export_generation, round_weights_to_fp16, verify_generation


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_generation_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_generation_model(tokenizer, seed=0)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, model, tokenizer):
    return tiny_generation_bundle_dir(tmp_path_factory.mktemp("gen") / "bundle", model=model, tokenizer=tokenizer)


def io(path):
    graph = onnx.load(str(path)).graph
    names = lambda values: {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
                            for v in values}
    return names(graph.input), names(graph.output)


def test_graphs_have_the_specs_names_and_dynamic_axes(bundle, model):
    spec = read_manifest(bundle).generation
    cfg = model.config
    assert spec.layers == [f"decoder_layer_{i:02d}.onnx" for i in (1, 2, 3)]
    assert spec.kv_fill == [f"decoder_kv_{i:02d}.onnx" for i in (1, 2, 3)]
    inputs, outputs = io(bundle / spec.encoder)
    assert inputs == {"input_ids": ["rows", "source"], "attention_mask": ["rows", "source"]}
    assert outputs == {"memory": ["rows", "source", cfg.d_model]}
    inputs, outputs = io(bundle / spec.cross_kv)
    kv = [cfg.decoder_layers, "rows", cfg.num_heads, "source", cfg.head_dim]
    assert outputs == {"cross_key": kv, "cross_value": kv}
    inputs, outputs = io(bundle / spec.embed)
    assert inputs == {"token_ids": ["rows"], "positions": ["rows"]} and outputs == {"hidden": ["rows", cfg.d_model]}
    inputs, outputs = io(bundle / spec.layers[1])
    cache = lambda axis: ["rows", cfg.num_heads, axis, cfg.head_dim]  # noqa: E731
    assert inputs == {"hidden": ["rows", cfg.d_model], "past_key": cache("past"), "past_value": cache("past"),
                      "cross_key": cache("source"), "cross_value": cache("source"),
                      "attention_mask": ["rows", "source"]}
    assert outputs == {"hidden_out": ["rows", cfg.d_model], "present_key": cache("present"),
                       "present_value": cache("present"), "exit_hidden": ["rows", cfg.d_model],
                       "exit_uncertainty": ["rows"]}
    inputs, outputs = io(bundle / spec.kv_fill[2])
    assert inputs == {"hidden": ["rows", cfg.d_model]} and outputs == {"key": cache(1), "value": cache(1)}
    assert spec.kv_fill_from == [f"decoder_kv_from_{i:02d}.onnx" for i in (1, 2, 3)]
    inputs, outputs = io(bundle / spec.kv_fill_from[1])
    stacked = [2, "rows", cfg.num_heads, 1, cfg.head_dim]  # layers 2 and 3 of 3
    assert inputs == {"hidden": ["rows", cfg.d_model]} and outputs == {"key": stacked, "value": stacked}
    inputs, outputs = io(bundle / spec.projection)
    assert inputs == {"exit_hidden": ["rows", cfg.d_model], "k": [1]}
    assert outputs == {"log_probs": ["rows", cfg.vocab_size], "top_log_probs": ["rows", "k"], "top_ids": ["rows", "k"]}


def test_the_projection_selects_the_top_tokens_as_the_search_would(bundle, tmp_path):
    """The graph's TopK against app/search.py top_candidates over its own log-probs: the same ids
    in the same order (ties by lower id), and a bundle without the TopK selects the same in numpy."""
    from app.search import top_candidates

    spec = read_manifest(bundle).generation
    graphs = DecoderGraphs(bundle, spec)
    hidden = np.random.default_rng(0).normal(size=(6, read_manifest(bundle).hidden_size)).astype(np.float32)
    hidden[3] = hidden[2]  # equal rows: equal values, the same order
    log_probs = graphs.project(hidden)
    for k in (1, 5, spec.vocab_size + 3):
        values, ids = graphs.top_tokens(hidden, k)
        expected_values, expected_ids = top_candidates(log_probs, k)
        np.testing.assert_array_equal(ids, expected_ids)
        np.testing.assert_allclose(values, expected_values, atol=1e-6)
        assert ids.shape == (6, min(k, spec.vocab_size)) and (np.diff(values, axis=1) <= 0).all()
    # A bundle made before the TopK: its projection has exit_hidden in and log_probs out only.
    older = tmp_path / "older"
    shutil.copytree(bundle, older)
    graph_model = onnx.load(str(older / spec.projection))
    g = graph_model.graph
    g.node.remove(next(n for n in g.node if n.op_type == "TopK"))
    g.input.remove(next(i for i in g.input if i.name == "k"))
    for name in ("top_log_probs", "top_ids"):
        g.output.remove(next(o for o in g.output if o.name == name))
    onnx.save(graph_model, str(older / spec.projection))
    old = DecoderGraphs(older, spec)
    np.testing.assert_array_equal(old.project(hidden), log_probs)
    np.testing.assert_array_equal(old.top_tokens(hidden, 5)[1], graphs.top_tokens(hidden, 5)[1])


def test_onnx_matches_pytorch_token_by_token_with_the_cache(bundle, model):
    spec = read_manifest(bundle).generation
    verification = verify_generation(model, bundle, spec, rows=4, steps=8)
    assert verification.passed and len(verification.max_abs_logit_diff) == 3
    assert max(verification.max_abs_logit_diff) < 1e-4


def test_a_layer_runs_from_an_empty_cache_and_one_row(bundle, model):
    """Shapes the graphs were not traced at: past length 0, one row, a longer source."""
    spec = read_manifest(bundle).generation
    graphs = DecoderGraphs(bundle, spec)
    cfg = model.config
    ids = np.array([[2, 7, 9, 11, 12, 13, 14, 15, 16, 3]], dtype=np.int64)
    mask = np.ones_like(ids)
    cross_key, cross_value = graphs.cross_kv(graphs.encode(ids, mask))
    hidden = graphs.embed(np.array([cfg.bos_id]), np.array([0]))
    empty = np.zeros((1, cfg.num_heads, 0, cfg.head_dim), dtype=np.float32)
    out, key, value, normed, uncertainty = graphs.layer(0, hidden, empty, empty, cross_key[0], cross_value[0], mask)
    with torch.no_grad():
        memory = model.encode(torch.from_numpy(ids), torch.from_numpy(mask))
        ck, cv = model.cross_keys_values(memory)
        x = model.embed(torch.tensor([cfg.bos_id]), torch.tensor([0]))[:, None]
        empty_t = torch.from_numpy(empty)
        expected, k, v = model.decoder_layers[0](x, empty_t, empty_t, ck[0], cv[0], None, None)
        _, expected_uncertainty = model.exit_state(0, expected[:, 0])
    assert key.shape == (1, cfg.num_heads, 1, cfg.head_dim)
    np.testing.assert_allclose(out, expected[:, 0].numpy(), atol=1e-5)
    np.testing.assert_allclose(key, k.numpy(), atol=1e-5)
    np.testing.assert_allclose(uncertainty, expected_uncertainty.numpy(), atol=1e-6)


def test_fp16_weights_halve_the_files_and_compute_what_the_rounded_model_does(tmp_path, bundle, model, tokenizer):
    rounded = round_weights_to_fp16(copy.deepcopy(model))
    weight = rounded.embedding.weight
    assert torch.equal(weight, weight.half().float()) and not torch.equal(weight, model.embedding.weight)
    half = tmp_path / "fp16"
    spec = read_manifest(bundle).generation
    # the tiny model's matrices are small: a lower bound than a real model's puts most in fp16
    assert export_generation(rounded, half, weights="fp16", fp16_min_elements=512) == \
        {k: getattr(spec, k) for k in ("encoder", "cross_kv", "embed", "layers", "kv_fill", "kv_fill_from",
                                                     "projection")}
    fp32_bytes = sum((bundle / f).stat().st_size for f in spec.files())
    fp16_bytes = sum((half / f).stat().st_size for f in spec.files())
    assert fp16_bytes < 0.7 * fp32_bytes
    graph = onnx.load(str(half / spec.layers[0])).graph
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in graph.initializer)
    assert all(int(np.prod(i.dims)) <= 512 for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT)
    verification = verify_generation(rounded, half, spec)
    assert verification.passed, verification
    # and the unrounded model is measurably not what they compute
    assert not verify_generation(model, half, spec, tolerance=1e-5).passed


def test_verification_fails_on_a_model_the_graphs_are_not(bundle, model):
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.decoder_layers[2].ffn[3].bias.add_(0.01)
    verification = verify_generation(other, bundle, read_manifest(bundle).generation)
    assert not verification.passed
    assert verification.max_abs_logit_diff[2] > 1e-3 and verification.max_abs_logit_diff[0] < 1e-4


def test_kv_fill_from_stacks_the_per_layer_fills_and_older_bundles_can_add_it(tmp_path, bundle, model):
    spec = read_manifest(bundle).generation
    hidden = np.random.default_rng(0).standard_normal((5, model.config.d_model)).astype(np.float32)
    joined, per_layer = DecoderGraphs(bundle, spec), DecoderGraphs(bundle, spec.model_copy(update={"kv_fill_from": None}))
    for first in range(len(spec.kv_fill)):
        key, value = joined.kv_fill_from(first, hidden)
        old_key, old_value = per_layer.kv_fill_from(first, hidden)
        assert key.shape == (len(spec.kv_fill) - first, 5, *old_key.shape[2:])
        np.testing.assert_array_equal(key, old_key)
        np.testing.assert_array_equal(value, old_value)
    # a bundle written before the field: drop it, then upgrade it in place
    old = tmp_path / "old"
    shutil.copytree(bundle, old)
    manifest = read_manifest(old)
    for name in spec.kv_fill_from:
        (old / name).unlink()
    write_manifest(old, manifest.model_copy(update={
        "generation": spec.model_copy(update={"kv_fill_from": None}),
        "files": [f for f in manifest.files if f.path not in spec.kv_fill_from]}))
    assert read_manifest(old).generation.kv_fill_from is None
    assert add_kv_fill_from(old) == spec.kv_fill_from
    assert read_manifest(old).generation.kv_fill_from == spec.kv_fill_from


def test_kv_fill_from_must_have_one_graph_a_layer(bundle):
    manifest = read_manifest(bundle)
    short = manifest.generation.kv_fill_from[:-1]
    with pytest.raises(ValueError, match="kv_fill_from"):
        type(manifest).model_validate({**manifest.model_dump(), "generation": {
            **manifest.generation.model_dump(), "kv_fill_from": short}})
