"""DiT's building blocks (ditq.models.layers): the fixed 2-D sin-cos position embedding, label dropout
and the timestep embedding's cos-first layout."""

import torch

from ditq.models import create_model


def test_pos_embed_is_fixed_sincos():
    model = create_model("DiT-S/4", input_size=16)
    pe = model.pos_embed[0]  # (16 tokens, 384)
    # token 0 sits at the origin: sin terms 0, cos terms 1 in both halves
    half = pe.shape[1] // 2
    assert torch.allclose(pe[0, : half // 2], torch.zeros(half // 2))
    assert torch.allclose(pe[0, half // 2 : half], torch.ones(half // 2))
    assert torch.allclose(pe[1, half:], pe[0, half:])  # same row -> same second half
    assert not torch.allclose(pe[1, :half], pe[0, :half])  # next column -> first half differs


def test_label_dropout_only_in_training():
    model = create_model("DiT-S/4", input_size=8, num_classes=10, class_dropout_prob=0.5)
    y = torch.zeros(1000, dtype=torch.long)
    dropped = model.y_embedder.token_drop(y)
    assert 0.4 < (dropped == 10).float().mean() < 0.6
    emb = model.y_embedder(y, train=False)
    assert torch.equal(emb, model.y_embedder.embedding_table.weight[0].expand(1000, -1))


def test_timestep_embedding_cos_first():
    from ditq.models.layers import TimestepEmbedder

    emb = TimestepEmbedder.timestep_embedding(torch.tensor([0.0, 3.0]), 256)
    assert torch.equal(emb[0, :128], torch.ones(128)) and torch.equal(emb[0, 128:], torch.zeros(128))
    assert torch.isclose(emb[1, 0], torch.cos(torch.tensor(3.0)))
    assert torch.isclose(emb[1, 128], torch.sin(torch.tensor(3.0)))
