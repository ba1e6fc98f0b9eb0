"""Models: the IMT mask, the one-interface contract, backbones, ID initialisation."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.features.store import TokenFeatures
from pipeline.models.backbones import build_backbone
from pipeline.models.imt import IDAwareMultimodalTransformer, imt_attention_mask
from pipeline.models.items import initial_id_table
from pipeline.models.odmt import ODMT, VARIANTS, ModelConfig

NUM_ITEMS, WIDTH = 12, 8


def features(num_tokens: int, dim: int, seed: int) -> TokenFeatures:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(NUM_ITEMS + 1, num_tokens, dim, generator=g).half()
    tokens[0] = 0
    mask = torch.ones(NUM_ITEMS + 1, num_tokens, dtype=torch.bool)
    mask[1::2, -1] = False  # odd items have a padded last text token
    present = torch.ones(NUM_ITEMS + 1, dtype=torch.bool)
    present[0] = False
    return TokenFeatures(tokens, mask, present, {})


def model(variant: str = "odmt", backbone: str = "sasrec", **kw) -> ODMT:
    torch.manual_seed(0)
    cfg = ModelConfig(variant=variant, backbone=backbone, width=WIDTH, max_len=5, **kw)
    return ODMT(cfg, NUM_ITEMS, features(4, 6, 1), features(3, 5, 2)).eval()


def test_mask_layout():
    allowed = imt_attention_mask(torch.tensor([[True, True, False]]), num_image_tokens=2, id_aware=True)[0]
    # columns: text0 text1 text2(pad) image0 image1 id
    expected = torch.tensor(
        [
            [1, 1, 0, 1, 1, 0],
            [1, 1, 0, 1, 1, 0],
            [1, 1, 0, 1, 1, 0],
            [1, 1, 0, 1, 1, 0],
            [1, 1, 0, 1, 1, 0],
            [1, 1, 0, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(allowed, expected)
    full = imt_attention_mask(torch.tensor([[True, True, False]]), num_image_tokens=2, id_aware=False)[0]
    assert full[:, -1].all() and not full[:, 2].any()


@pytest.mark.parametrize("id_aware", [True, False])
def test_id_token_reaches_only_the_id_output(id_aware):
    torch.manual_seed(0)
    imt = IDAwareMultimodalTransformer(WIDTH, layers=2, heads=2, dropout=0.1, id_aware=id_aware).eval()
    text, image, ident = torch.randn(3, 4, WIDTH), torch.randn(3, 2, WIDTH), torch.randn(3, WIDTH)
    mask = torch.tensor([[True, True, True, False]] * 3)
    before = imt(text, mask, image, ident)
    after = imt(text, mask, image, ident + 1.0)
    assert not torch.allclose(before[2], after[2])  # the ID output changes
    if id_aware:
        assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    else:  # full attention (the ablation): the ID leaks into the content outputs
        assert not torch.allclose(before[0], after[0])


def test_padded_text_token_changes_nothing():
    torch.manual_seed(0)
    imt = IDAwareMultimodalTransformer(WIDTH, layers=2, heads=2, dropout=0.1).eval()
    text, image, ident = torch.randn(2, 4, WIDTH), torch.randn(2, 2, WIDTH), torch.randn(2, WIDTH)
    mask = torch.tensor([[True, True, False, False]] * 2)
    changed = text.clone()
    changed[:, 2:] += 5.0
    for a, b in zip(imt(text, mask, image, ident), imt(changed, mask, image, ident)):
        assert torch.equal(a, b)
    real_changed = text.clone()
    real_changed[:, 1] += 5.0  # a real token does matter
    assert not torch.allclose(imt(text, mask, image, ident)[0], imt(real_changed, mask, image, ident)[0])


def test_padded_text_features_change_nothing_through_the_model():
    m = model()
    ids = torch.tensor([1, 3, 4])  # 1 and 3 have a padded last text token
    before = m.items(ids)
    m.items.sources.text_tokens[1, -1] += 3.0
    m.items.sources.text_tokens[3, -1] += 3.0
    after = m.items(ids)
    assert torch.equal(before, after)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fused_score_is_one_inner_product(variant):
    m = model(variant)
    sequences = torch.tensor([[0, 0, 3, 4, 5], [1, 2, 3, 4, 6], [0, 0, 0, 0, 7]])
    users, items = m.user_vectors(sequences), m.item_vectors()
    nb, d = len(m.branches), m.branch_dim
    assert users.shape == (3, nb * d) and items.shape == (NUM_ITEMS + 1, nb * d)
    branch_scores = [(users[:, b * d : (b + 1) * d] * nb) @ items[:, b * d : (b + 1) * d].T for b in range(nb)]
    assert torch.allclose(users @ items.T, torch.stack(branch_scores).mean(0), atol=1e-5)
    # a left-padded shorter input is the same sequence
    assert torch.allclose(m.user_vectors(sequences[:1, 2:]), users[:1], atol=1e-6)


def test_item_encoder_runs_once_per_distinct_item():
    m = model().train()
    seen = []
    m.items.register_forward_hook(lambda module, args, out: seen.append(args[0].numel()))
    slots = torch.tensor([[0, 1, 2, 3, 2], [4, 1, 1, 2, 5]])
    states, vectors = m(slots)
    assert seen == [6]  # items 0..5, not 10 slots
    assert states.shape == (3, 2, 4, WIDTH) and vectors.shape == (3, 2, 5, WIDTH)
    assert torch.equal(vectors[:, 0, 1], vectors[:, 1, 1])  # the same item gets the same vector


@pytest.mark.parametrize("backbone", ["sasrec", "gru4rec", "nextitnet"])
def test_backbones_are_causal(backbone):
    torch.manual_seed(0)
    encoder = build_backbone(backbone, WIDTH, max_len=6, layers=2, heads=2, dropout=0.0).eval()
    x = torch.randn(2, 6, WIDTH)
    real = torch.ones(2, 6, dtype=torch.bool)
    changed = x.clone()
    changed[:, 4:] = torch.randn(2, 2, WIDTH)  # not a constant shift: LayerNorm would remove it
    a, b = encoder(x, real), encoder(changed, real)
    assert a.shape == (2, 6, WIDTH)
    assert torch.allclose(a[:, :4], b[:, :4], atol=1e-6) and not torch.allclose(a[:, 4:], b[:, 4:])


def test_sasrec_ignores_padding_keys():
    torch.manual_seed(0)
    encoder = build_backbone("sasrec", WIDTH, max_len=4, layers=2, heads=2, dropout=0.0).eval()
    x = torch.randn(1, 4, WIDTH)
    real = torch.tensor([[False, False, True, True]])
    changed = x.clone()
    changed[:, :2] = torch.randn(1, 2, WIDTH)
    assert torch.allclose(encoder(x, real)[:, 2:], encoder(changed, real)[:, 2:], atol=1e-6)


def test_id_init_from_cls_features():
    text, image = features(4, WIDTH, 1), features(3, WIDTH, 2)
    image.present[2] = False  # item 2 has no image: only its text counts
    like = torch.randn(NUM_ITEMS + 1, WIDTH) * 0.05
    table = initial_id_table("mean_cls", WIDTH, text, image, like)
    mean_cls = (text.tokens[:, 0].double() + image.tokens[:, 0].double()) / 2
    mean_cls[2] = text.tokens[2, 0].double()
    ratio = table[1:].double() / mean_cls[1:]  # dims match: the mean CLS features, rescaled
    assert torch.allclose(ratio, ratio[0, 0].expand_as(ratio), rtol=1e-3)
    assert torch.equal(table[0], torch.zeros(WIDTH))
    assert math.isclose(table[1:].std().item(), like[1:].std().item(), rel_tol=1e-3)
    assert initial_id_table("random", WIDTH, text, image, like) is None
    # other dims: centred, onto the principal directions
    reduced = initial_id_table("text_cls", WIDTH, features(4, 20, 3), None, like)
    assert reduced.shape == like.shape and reduced[1:].abs().sum() > 0
    with pytest.raises(ValueError, match="needs the features"):
        initial_id_table("image_cls", WIDTH, text, None, like)


def test_id_only_baseline_starts_random_and_reads_no_features():
    torch.manual_seed(0)
    m = ODMT(ModelConfig(variant="sasrec_id", width=WIDTH, max_len=5), NUM_ITEMS)
    assert m.items.sources.text_proj is None and m.items.sources.image_proj is None
    with pytest.raises(ValueError, match="needs text features"):
        ODMT(ModelConfig(variant="text_only", width=WIDTH, max_len=5), NUM_ITEMS)
