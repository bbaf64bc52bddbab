import json

from training.model import EarlyExitModel


def test_checkpoint_is_a_self_contained_teacher(tiny_bundle):
    """Backbone, heads, labels, recipe and tokenizer: enough to distil from without the bundle."""
    checkpoint = tiny_bundle["checkpoint"]
    assert (checkpoint / "tokenizer.json").read_bytes() == (tiny_bundle["bundle"] / "tokenizer.json").read_bytes()
    model, meta = EarlyExitModel.load(checkpoint)
    assert meta["labels"] == ["0", "1"] and meta["recipe"]["seed"] == 42 and model.num_layers == 3
    assert json.loads((checkpoint / "train_log.jsonl").read_text().splitlines()[-1])["stage"].startswith("stage 2")
