"""Models: the IMT mask, the one-interface contract, backbones, ID initialisation."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.features.store import TokenFeatures
from pipeline.models.backbones import build_backbone
from pipeline.models.imt import IDAwareMultimodalTransformer, imt_attention_mask
from pipeline.models import items, layers, odmt
from pipeline.models.items import _to_width, initial_id_table
from pipeline.models.layers import Dropout, TransformerBlock
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
    assert not torch.allclose(before["id"], after["id"])  # the ID output changes
    if id_aware:
        assert torch.equal(before["text"], after["text"]) and torch.equal(before["image"], after["image"])
    else:  # full attention (the ablation): the ID leaks into the content outputs
        assert not torch.allclose(before["text"], after["text"])


def test_padded_text_token_changes_nothing():
    torch.manual_seed(0)
    imt = IDAwareMultimodalTransformer(WIDTH, layers=2, heads=2, dropout=0.1).eval()
    text, image, ident = torch.randn(2, 4, WIDTH), torch.randn(2, 2, WIDTH), torch.randn(2, WIDTH)
    mask = torch.tensor([[True, True, False, False]] * 2)
    changed = text.clone()
    changed[:, 2:] += 5.0
    before, after = imt(text, mask, image, ident), imt(changed, mask, image, ident)
    assert all(torch.equal(before[k], after[k]) for k in ("text", "image", "id"))
    real_changed = text.clone()
    real_changed[:, 1] += 5.0  # a real token does matter
    assert not torch.allclose(before["text"], imt(real_changed, mask, image, ident)["text"])


def test_padded_text_features_change_nothing_through_the_model():
    m = model()
    ids = torch.tensor([1, 3, 4])  # 1 and 3 have a padded last text token
    before = m.items(ids)
    m.items.sources.text_tokens[1, -1] += 3.0
    m.items.sources.text_tokens[3, -1] += 3.0
    after = m.items(ids)
    assert torch.equal(before, after)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("ffn_dropout", [False, True])
@pytest.mark.parametrize("attention_dropout", [False, True])
def test_a_block_computing_some_query_rows_gives_those_rows_of_the_full_block(training, ffn_dropout, attention_dropout):
    """The IMT's last block computes only its output tokens' rows: the full block's rows (in
    training with its dropout layers present but at p = 0, where no mask is random)."""
    torch.manual_seed(0)
    block = TransformerBlock(WIDTH, heads=2, dropout=0.0 if training else 0.3, ffn_dropout=ffn_dropout, attention_dropout=attention_dropout).train(training)
    x = torch.randn(4, 7, WIDTH)
    allowed = imt_attention_mask(torch.tensor([[True] * 3 + [False]] * 4), num_image_tokens=2, id_aware=True)
    queries = torch.tensor([0, 4, 6])
    assert torch.allclose(block(x, allowed, queries), block(x, allowed)[:, queries], atol=1e-6)


@pytest.mark.parametrize("ffn_dropout", [False, True])
@pytest.mark.parametrize("attention_dropout", [False, True])
def test_a_block_computing_some_query_rows_draws_dropout_masks_for_those_rows_only(ffn_dropout, attention_dropout, monkeypatch):
    drawn = []

    def recording(shape, p):
        drawn.append(tuple(shape))
        return layers_drop_mask(shape, p)

    layers_drop_mask = layers.drop_mask
    monkeypatch.setattr(layers, "drop_mask", recording)
    block = TransformerBlock(WIDTH, heads=2, dropout=0.3, ffn_dropout=ffn_dropout, attention_dropout=attention_dropout).train()
    allowed = imt_attention_mask(torch.ones(4, 3, dtype=torch.bool), num_image_tokens=3, id_aware=True)
    rows = block(torch.randn(4, 7, WIDTH), allowed, torch.tensor([0, 6]))
    assert rows.shape == (4, 2, WIDTH)
    assert len(drawn) == 2 + ffn_dropout + attention_dropout
    assert all(shape[1] == 2 or shape[2] == 2 for shape in drawn)  # (n, 2, width) or attention (n, heads, 2, keys)


def test_dropout_zeroes_entries_at_rate_p_keeps_a_bool_mask_and_follows_torch_seed():
    drop = Dropout(0.3)
    x = torch.ones(1000, 1000, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        torch.manual_seed(5)
        y = drop(x)
    zeroed = (y == 0).float().mean().item()
    assert abs(zeroed - 0.3) < 0.003  # 1e6 draws: standard error 0.00046
    assert torch.allclose(y[y != 0], torch.full((1,), 1 / 0.7))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # the gradient passes the same mask, scaled alike
    assert [t.dtype for t in saved] == [torch.bool]  # not a float noise tensor
    torch.manual_seed(5)
    assert torch.equal(drop(x), y)
    assert torch.equal(drop.eval()(x), x)


def training_step_gradients(m: ODMT, slots: torch.Tensor) -> list[torch.Tensor]:
    torch.manual_seed(3)
    states, vectors = m(slots)
    (states.square().sum() + vectors.sum()).backward()
    return [p.grad.clone() for p in m.parameters() if p.grad is not None]


@pytest.mark.parametrize("fast", [False, True])
def test_imt_recompute_redraws_each_chunks_dropout_masks(fast, monkeypatch):
    """imt_recompute: the item encoder in checkpointed chunks; the backward pass recomputes each
    chunk with the masks of its forward, so the gradients are those of the same chunks kept in
    memory (the checkpoint replaced by a plain call)."""
    monkeypatch.setattr(odmt, "ITEM_CHUNK", 5)  # 12 slots: chunks of 5, 5 and 2 items
    slots = torch.tensor([[0, 1, 2, 3, 4, 5], [2, 2, 7, 9, 11, 12]])
    recomputed = training_step_gradients(model(imt_recompute=True, fast_item_encoder=fast, dropout=0.2).train(), slots)
    monkeypatch.setattr(items, "checkpoint", lambda function, *args, **kwargs: function(*args))
    kept = training_step_gradients(model(imt_recompute=True, fast_item_encoder=fast, dropout=0.2).train(), slots)
    assert len(recomputed) == len(kept) > 0
    assert all(torch.equal(a, b) for a, b in zip(recomputed, kept))


def test_imt_recompute_without_dropout_gives_the_step_of_one_pass(monkeypatch):
    """Without dropout the chunks change nothing but float rounding (gradients that cancel to
    ~1e-5 keep ~1e-6 of it)."""
    monkeypatch.setattr(odmt, "ITEM_CHUNK", 5)
    slots = torch.tensor([[0, 1, 2, 3, 4, 5], [2, 2, 7, 9, 11, 12]])
    chunked = training_step_gradients(model(imt_recompute=True, dropout=0.0).train(), slots)
    whole = training_step_gradients(model(dropout=0.0).train(), slots)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-5) for a, b in zip(chunked, whole))


def test_fast_item_encoder_gives_the_same_training_step_to_float_rounding():
    """Without dropout (whose masks the two paths draw for other shapes) the same loss and
    gradients up to rounding."""
    slots = torch.tensor([[0, 1, 2, 3, 4, 5], [2, 2, 7, 9, 11, 12]])
    results = []
    for fast in (False, True):
        m = model(fast_item_encoder=fast, dropout=0.0).train()
        states, vectors = m(slots)
        (states.square().sum() + vectors.sum()).backward()
        results.append((states, [p.grad for p in m.parameters() if p.grad is not None]))
    (states, gradients), (fast_states, fast_gradients) = results
    assert torch.allclose(states, fast_states, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(gradients, fast_gradients))


def test_items_with_repeated_ids_get_the_vectors_of_each_id():
    """The fast item encoder projects each distinct item of a call once and gathers it to its
    slots, and computes the IMT's last block at the output tokens only."""
    m = model(fast_item_encoder=True)
    ids = torch.tensor([3, 1, 3, 0, 7, 1])
    with torch.no_grad():
        together = m.items(ids)
        one_by_one = torch.cat([m.items(i[None]) for i in ids], dim=1)
    assert together.shape == (3, 6, WIDTH)
    assert torch.allclose(together, one_by_one, atol=1e-6)


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


@pytest.mark.parametrize("variant", ["odmt", "odmt_no_imt", "sasrec_id"])
def test_the_fused_score_is_the_mean_of_the_branch_scores_of_the_training_pass(variant):
    """Independent of user_vectors' own scaling: each branch's score from the training pass (its
    state after the last input item . the item's branch vector), averaged over the branches."""
    m = model(variant)
    sequences = torch.tensor([[0, 3, 4, 5, 6], [1, 2, 3, 4, 6]])
    with torch.no_grad():
        states, _ = m(torch.nn.functional.pad(sequences, (0, 1)))  # inputs: the sequences; the slot after: unused
        items = m.item_vectors().unflatten(1, (len(m.branches), -1)).transpose(0, 1)  # (branches, N+1, d)
        branch_scores = torch.einsum("bud,bnd->bun", states[:, :, -1], items)
        fused = m.user_vectors(sequences) @ m.item_vectors().T
    assert torch.allclose(fused, branch_scores.mean(0), atol=1e-5)


@pytest.mark.parametrize("how", ["mean_cls", "text_cls", "image_cls"])
def test_odmt_starts_its_id_table_from_the_content_features(how):
    m = model(id_init=how)
    expected = initial_id_table(how, WIDTH, features(4, 6, 1), features(3, 5, 2), torch.zeros(NUM_ITEMS + 1, WIDTH))
    assert torch.equal(m.items.sources.id_table.weight.detach(), expected.float())


@pytest.mark.parametrize("per_slot", [True, False])
def test_item_dropout_per_slot_or_per_distinct_item(per_slot):
    m = model(dropout_per_slot=per_slot).train()
    seen = []
    m.items.register_forward_hook(lambda module, args, out: seen.append(args[0].numel()))
    slots = torch.tensor([[0, 1, 2, 3, 2], [4, 1, 1, 2, 5]])
    states, vectors = m(slots)
    assert states.shape == (3, 2, 4, WIDTH) and vectors.shape == (3, 2, 5, WIDTH)
    # per slot (the reference): 10 slots, each its own dropout mask; else items 0..5 once each
    assert seen == ([10] if per_slot else [6])
    assert torch.equal(vectors[:, 0, 1], vectors[:, 1, 1]) != per_slot
    m.eval()  # no dropout: the same item has the same vector either way
    _, vectors = m(slots)
    assert torch.equal(vectors[:, 0, 1], vectors[:, 1, 1])


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


@pytest.mark.parametrize("backbone", ["sasrec", "gru4rec", "nextitnet"])
def test_user_state_is_the_last_positions_state(backbone):
    """user_state (SASRec: its last block on the last row only) = the full states' last row."""
    torch.manual_seed(0)
    encoder = build_backbone(backbone, WIDTH, max_len=6, layers=2, heads=2, dropout=0.0).eval()
    x = torch.randn(3, 6, WIDTH)
    real = torch.tensor([[True] * 6, [False, False] + [True] * 4, [False] * 5 + [True]])
    x[~real] = 0
    user = encoder.user_state(x, real)
    assert user.shape == (3, WIDTH)
    assert torch.allclose(user, encoder(x, real)[:, -1], atol=1e-6)


@pytest.mark.parametrize("backbone", ["sasrec", "gru4rec", "nextitnet"])
def test_states_do_not_depend_on_the_padding_before_a_sequence(backbone):
    torch.manual_seed(0)
    encoder = build_backbone(backbone, WIDTH, max_len=8, layers=2, heads=2, dropout=0.0).eval()
    history = torch.randn(1, 3, WIDTH)
    states = []
    for padding in (0, 2, 5):  # the same three items after 0, 2 and 5 padded slots
        x = torch.cat([torch.zeros(1, padding, WIDTH), history], dim=1)
        real = torch.cat([torch.zeros(1, padding, dtype=torch.bool), torch.ones(1, 3, dtype=torch.bool)], dim=1)
        states.append(encoder(x, real)[:, -3:])
        garbage = x.clone()
        garbage[:, :padding] = torch.randn(1, padding, WIDTH)  # whatever sits in the padded slots
        assert torch.allclose(encoder(garbage, real)[:, -3:], states[-1], atol=1e-6)
    assert torch.allclose(states[0], states[1], atol=1e-5) and torch.allclose(states[0], states[2], atol=1e-5)


def test_the_branch_encoders_share_no_parameters():
    m = model()
    per_branch = [{p.data_ptr() for p in encoder.parameters()} for encoder in m.encoders]
    assert len(per_branch) == 3 and all(per_branch)
    assert not (per_branch[0] & per_branch[1] or per_branch[0] & per_branch[2] or per_branch[1] & per_branch[2])
    heads = [{p.data_ptr() for p in m.items.heads[b].parameters()} for b in m.branches]
    assert not (heads[0] & heads[1] or heads[0] & heads[2] or heads[1] & heads[2])


# --- every deviation from the reference is a switch whose default is the reference ------------


def test_switch_defaults_are_the_reference():
    cfg = ModelConfig()
    assert (cfg.id_projection, cfg.id_scale_sqrt_width, cfg.id_init_rescale, cfg.head_init_scale) == (True, False, False, 1.0)
    assert (cfg.xavier_init, cfg.ffn_dropout, cfg.dropout_per_slot, cfg.attention_dropout) == ("encoders", False, True, False)


def test_attention_dropout_switch():
    """With the residual dropout off, a training block differs from its eval self only by the
    dropout on the attention weights (the rows-only path draws the same: the test above)."""
    x, allowed = torch.randn(4, 6, WIDTH), torch.ones(1, 6, 6, dtype=torch.bool)
    for switch in (False, True):
        torch.manual_seed(0)
        block = TransformerBlock(WIDTH, heads=2, dropout=0.5, attention_dropout=switch)
        block.drop = torch.nn.Identity()
        assert torch.allclose(block.train()(x, allowed), block.eval()(x, allowed), atol=1e-6) != switch
    m = model(attention_dropout=True)
    assert all(block.attention_dropout == 0.1 for block in m.modules() if isinstance(block, TransformerBlock))


def test_id_projection_and_sqrt_width_scale():
    paper, ours = model(), model(id_projection=False, id_scale_sqrt_width=True)
    ids = torch.tensor([1, 2, 3])
    sources = paper.items.sources
    assert torch.allclose(sources.ident(ids), sources.id_proj(sources.id_table(ids)))  # a Linear(d, d), no scale
    assert ours.items.sources.id_proj is None
    assert torch.allclose(ours.items.sources.ident(ids), ours.items.sources.id_table(ids) * math.sqrt(WIDTH))


def test_head_init_scale_multiplies_only_the_last_head_layer():
    full, small = model().state_dict(), model(head_init_scale=0.05).state_dict()
    scaled = {k for k in full if k.startswith("items.heads.") and k.endswith(".2.weight")}
    assert len(scaled) == 3
    for key in full:
        assert torch.allclose(small[key], full[key] * 0.05) if key in scaled else torch.equal(small[key], full[key])


def test_xavier_init_on_the_encoders_only_or_everywhere():
    def item_biases(m):
        return torch.cat([m.items.heads[b][0].bias for b in m.branches])

    def encoder_biases(m):
        return torch.cat([mod.bias for mod in m.encoders.modules() if isinstance(mod, torch.nn.Linear) and mod.bias is not None])

    reference, everywhere = model(), model(xavier_init="all")
    assert (encoder_biases(reference) == 0).all() and (encoder_biases(everywhere) == 0).all()  # xavier: zero biases
    assert (item_biases(reference) != 0).all()  # PyTorch's own init outside the encoders
    assert (item_biases(everywhere) == 0).all()


def test_ffn_dropout_switch():
    assert isinstance(model().items.imt.blocks[0].ffn[2], torch.nn.Identity)
    assert isinstance(model(ffn_dropout=True).items.imt.blocks[0].ffn[2], Dropout)
    assert isinstance(model(ffn_dropout=True).encoders[0].blocks[0].ffn[2], Dropout)


# --- fewer sources -----------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["odmt", "odmt_no_imt", "early_fusion_concat"])
def test_a_run_without_images_has_no_image_branch(variant):
    torch.manual_seed(0)
    m = ODMT(ModelConfig(variant=variant, width=WIDTH, max_len=5), NUM_ITEMS, features(4, 6, 1), None, sources=("id", "text")).eval()
    assert m.items.sources.image_proj is None
    assert m.branches == (("fused",) if variant.startswith("early") else ("id", "text"))
    users, items = m.user_vectors(torch.tensor([[0, 1, 2, 3, 4]])), m.item_vectors()
    assert users.shape == (1, len(m.branches) * WIDTH) and items.shape == (NUM_ITEMS + 1, len(m.branches) * WIDTH)
    with pytest.raises(ValueError, match="train.modalities"):
        ODMT(ModelConfig(variant="image_only", width=WIDTH, max_len=5), NUM_ITEMS, None, None, sources=("id", "text"))


def test_imt_without_image_tokens_keeps_the_id_aware_mask():
    allowed = imt_attention_mask(torch.tensor([[True, False]]), num_image_tokens=0, id_aware=True)[0]
    assert torch.equal(allowed, torch.tensor([[1, 0, 0], [1, 0, 0], [1, 0, 1]], dtype=torch.bool))
    torch.manual_seed(0)
    imt = IDAwareMultimodalTransformer(WIDTH, layers=1, heads=2, dropout=0.0).eval()
    text, ident = torch.randn(2, 3, WIDTH), torch.randn(2, WIDTH)
    out = imt(text, torch.ones(2, 3, dtype=torch.bool), None, ident)
    assert set(out) == {"text", "id"} and torch.equal(out["text"], imt(text, torch.ones(2, 3, dtype=torch.bool), None, ident + 1)["text"])


def test_id_init_from_cls_features():
    text, image = features(4, WIDTH, 1), features(3, WIDTH, 2)
    image.present[2] = False  # item 2 has no image: only its text counts
    like = torch.randn(NUM_ITEMS + 1, WIDTH) * 0.05
    mean_cls = (text.tokens[:, 0].double() + image.tokens[:, 0].double()) / 2
    mean_cls[2] = text.tokens[2, 0].double()
    # dims match: the mean CLS features as they are (the reference)
    assert torch.allclose(initial_id_table("mean_cls", WIDTH, text, image, like).double(), mean_cls, atol=1e-6)
    table = initial_id_table("mean_cls", WIDTH, text, image, like, rescale=True)
    ratio = table[1:].double() / mean_cls[1:]  # rescaled (ours): the same directions
    assert torch.allclose(ratio, ratio[0, 0].expand_as(ratio), rtol=1e-3)
    assert torch.equal(table[0], torch.zeros(WIDTH))
    assert math.isclose(table[1:].std().item(), like[1:].std().item(), rel_tol=1e-3)
    assert initial_id_table("random", WIDTH, text, image, like) is None
    # other dims: centred, onto the principal directions
    reduced = initial_id_table("text_cls", WIDTH, features(4, 20, 3), None, like)
    assert reduced.shape == like.shape and reduced[1:].abs().sum() > 0
    with pytest.raises(ValueError, match="needs the features"):
        initial_id_table("image_cls", WIDTH, text, None, like)


def test_id_init_directions_from_a_sample_in_large_catalogues(monkeypatch):
    # integer features of rank 3 (exact in float16): any sample of them spans the same subspace
    g = torch.Generator().manual_seed(0)
    n, dim = 40, 20
    cls = (torch.randint(-3, 4, (n + 1, 3), generator=g) @ torch.randint(-3, 4, (3, dim), generator=g) + 5).half()
    rows = torch.arange(1, n + 1)
    centred = cls[rows].double() - cls[rows].double().mean(0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    # up to the sample size: the exact computation over all rows, to the bit
    assert torch.equal(_to_width(cls, rows, WIDTH, sample=n), centred @ vh[:WIDTH].T)
    # above it: directions from 10 items, all 40 projected 7 at a time, pairwise geometry kept
    # (to float32's precision: the wide arithmetic is float32 there)
    monkeypatch.setattr(items, "PROJECT_ROWS", 7)
    sampled = _to_width(cls, rows, WIDTH, sample=10)
    assert sampled.shape == (n, WIDTH) and sampled.dtype == torch.float64
    assert torch.allclose(sampled @ sampled.T, centred @ centred.T, rtol=1e-5, atol=1e-3)
    assert torch.allclose(sampled.mean(0), torch.zeros(WIDTH, dtype=torch.float64), atol=1e-5)  # centred on all rows


def test_top_eigenvectors_are_the_largest_first():
    basis, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    scatter = basis @ torch.diag(torch.tensor([1.0, 5.0, 3.0, 0.5, 4.0, 2.0], dtype=torch.float64)) @ basis.T
    top = items._top_eigenvectors(scatter, 3)
    assert top.shape == (6, 3)
    for vector, column in zip(top.T, (1, 4, 2)):  # eigenvalues 5, 4, 3
        assert torch.allclose(vector.abs(), basis[:, column].abs(), atol=1e-10)
    assert items._top_eigenvectors(scatter, 10).shape == (6, 6)  # more asked than there are: all


def test_id_only_baseline_starts_random_and_reads_no_features():
    torch.manual_seed(0)
    m = ODMT(ModelConfig(variant="sasrec_id", width=WIDTH, max_len=5), NUM_ITEMS)
    assert m.items.sources.text_proj is None and m.items.sources.image_proj is None
    with pytest.raises(ValueError, match="needs text features"):
        ODMT(ModelConfig(variant="text_only", width=WIDTH, max_len=5), NUM_ITEMS)
