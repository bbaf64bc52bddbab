import torch

from training.model import EarlyExitModel, backbone_from_config


def tiny_model(head="fastbert") -> EarlyExitModel:
    torch.manual_seed(0)
    backbone = backbone_from_config(vocab_size=50, hidden_size=16, num_hidden_layers=3,
                                    num_attention_heads=2, intermediate_size=32)
    return EarlyExitModel(backbone, num_labels=3, exit_head=head, head_width=8).eval()


def batch():
    ids = torch.tensor([[2, 5, 6, 7, 3], [2, 9, 3, 0, 0]])
    mask = (ids != 0).long()
    return ids, mask, torch.zeros_like(ids)


def test_layer_by_layer_path_equals_the_transformers_forward():
    model = tiny_model()
    ids, mask, types = batch()
    with torch.no_grad():
        ours = model.hidden_states(ids, mask, types)
        theirs = model.backbone(input_ids=ids, attention_mask=mask, token_type_ids=types,
                                output_hidden_states=True).hidden_states[1:]
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a * mask[..., None], b * mask[..., None], atol=1e-5, rtol=1e-5)


def test_one_exit_per_layer_and_padding_does_not_change_a_row():
    for head in ("fastbert", "pooled"):
        model = tiny_model(head)
        ids, mask, types = batch()
        with torch.no_grad():
            logits = model(ids, mask, types)
            alone = model(ids[1:, :3], mask[1:, :3], types[1:, :3])
        assert len(logits) == 3 and logits[0].shape == (2, 3)
        for padded, unpadded in zip(logits, alone):
            torch.testing.assert_close(padded[1:], unpadded, atol=1e-5, rtol=1e-5)


def test_checkpoint_round_trip(tmp_path):
    model = tiny_model()
    model.save(tmp_path, {"labels": ["a", "b", "c"]})
    loaded, meta = EarlyExitModel.load(tmp_path)
    ids, mask, types = batch()
    with torch.no_grad():
        for a, b in zip(model(ids, mask, types), loaded(ids, mask, types)):
            torch.testing.assert_close(a, b)
    assert meta["labels"] == ["a", "b", "c"] and loaded.exit_head == "fastbert"


def test_replace_exits_keeps_the_teacher_classifier():
    model = tiny_model("fastbert")
    teacher = model.heads[-1]
    model.replace_exits("pooled")
    assert model.heads[-1] is teacher and model.exit_head == "pooled"
    assert type(model.heads[0]).__name__ == "PooledHead"
