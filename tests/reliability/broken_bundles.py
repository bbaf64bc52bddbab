"""Ways a bundle can be broken while its manifest still checks out: every file's sha256 and
size are re-written to match the damage, so only loading, session building or warm-up can
tell (the hard cases: a truncated upload whose manifest was regenerated, a wrong tokenizer)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from app.manifest import describe_file

KINDS = ("truncated_graph", "garbage_tokenizer", "format_version", "missing_operator", "shape_mismatch",
         "invalid_manifest")


def _rehash(bundle: Path) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"] = [describe_file(bundle, f["path"]).model_dump() for f in manifest["files"]]
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def _graph(path: Path, hidden_size: int, op: tuple[str, str] | None = None) -> None:
    import onnx
    from onnx import TensorProto, helper

    hidden = helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["rows", "tokens", hidden_size])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["rows", "tokens"])
    out = helper.make_tensor_value_info("hidden_out", TensorProto.FLOAT, ["rows", "tokens", hidden_size])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["rows", hidden_size])
    op_type, domain = op or ("Identity", "")
    nodes = [helper.make_node(op_type, ["hidden"], ["hidden_out"], domain=domain),
             helper.make_node("ReduceMean", ["hidden"], ["logits"], axes=[1], keepdims=0)]
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(helper.make_graph(nodes, "broken", [hidden, mask], [out, logits]),
                              opset_imports=opsets)
    onnx.save(model, str(path))


def broken_copy(source: Path, target: Path, kind: str) -> Path:
    """A copy of `source` at `target`, broken in the way `kind` says."""
    shutil.copytree(source, target)
    manifest_path = target / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    first_layer = target / manifest["graphs"]["layers"][0]
    if kind == "truncated_graph":
        data = first_layer.read_bytes()
        first_layer.write_bytes(data[: len(data) // 2])
    elif kind == "garbage_tokenizer":
        (target / manifest["tokenizer"]).write_text('{"version": "1.0", "model": {"type": "Nonsense"}}')
    elif kind == "format_version":
        manifest["format_version"] = 99
        manifest_path.write_text(json.dumps(manifest))
    elif kind == "missing_operator":
        _graph(first_layer, manifest["hidden_size"], op=("NoSuchOperator", "com.example.missing"))
    elif kind == "shape_mismatch":  # a layer of another model's width: fails only when run
        _graph(first_layer, manifest["hidden_size"] + 3)
    elif kind == "invalid_manifest":
        manifest_path.write_text('{"format_version": 1, "name": ')
        return target
    else:
        raise ValueError(kind)
    _rehash(target)
    return target
