"""Task resolver contract and registry; user feature encoder fitting, masking and JSON round trip."""

from __future__ import annotations

import json

import pytest
import torch

from idrecog.data.manifest import Sample
from idrecog.data.resolution import (
    DocTypeResolver,
    TaskResolver,
    create_task_resolver,
    list_task_resolvers,
    register_task_resolver,
)
from idrecog.errors import ConfigError
from idrecog.models.user import UserFeatureEncoder
from idrecog.tasks.catalogue import TaskCatalogue, TaskSpec, default_catalogue


def _s(i: int, doc_type: str | None) -> Sample:
    return Sample(id=str(i), image=f"{i}.png", labels={}, doc_type=doc_type)


def test_doc_type_resolver_contract() -> None:
    cat = default_catalogue()
    samples = [_s(0, "brv_driving_licence"), _s(1, None), _s(2, "ald_id_card")]
    out = DocTypeResolver(cat).resolve(samples, "train")
    assert len(out) == len(samples)
    assert out[0] == [n for n in cat.names if n in cat.tasks_for("brv_driving_licence")]
    assert "hologram" not in out[0] and "nationality_match" not in out[0]
    assert out[1] == cat.names  # missing doc type: all tasks by default
    assert out[2] == cat.names  # ald_id_card has every task
    # catalogue order is kept even if the doc_types mapping lists tasks in another order
    shuffled = TaskCatalogue(cat.tasks, {k: list(reversed(v)) for k, v in (cat.doc_types or {}).items()})
    assert DocTypeResolver(shuffled).resolve(samples[:1], "val") == out[:1]
    skip = DocTypeResolver(cat, missing="skip")
    assert skip.resolve(samples, "train")[1] == []
    assert "skip" in skip.describe()
    with pytest.raises(ConfigError, match="missing"):
        DocTypeResolver(cat, missing="drop")


def test_catalogue_without_doc_types_applies_everything() -> None:
    cat = TaskCatalogue(
        [TaskSpec("a", "classification", classes=("x", "y")), TaskSpec("b", "regression", range=(0.0, 1.0))]
    )
    assert DocTypeResolver(cat).resolve([_s(0, "anything"), _s(1, None)], "train") == [["a", "b"], ["a", "b"]]


def test_resolver_registry() -> None:
    assert {"doc_type", "all"} <= set(list_task_resolvers())
    cat = default_catalogue()
    r = create_task_resolver("doc_type", cat, missing="skip")
    assert isinstance(r, DocTypeResolver) and r.missing == "skip"
    with pytest.raises(ConfigError, match=r"unknown task resolver 'nope'.*doc_type"):
        create_task_resolver("nope", cat)
    with pytest.raises(ConfigError, match="resolver_args"):
        create_task_resolver("doc_type", cat, bogus=1)

    @register_task_resolver
    class FirstTaskOnly(TaskResolver):
        name = "test_first_task_only"

        def resolve(self, samples, split):
            return [[self.catalogue.names[0]] for _ in samples]

    r = create_task_resolver("test_first_task_only", cat)
    assert r.resolve([_s(0, None)], "test") == [["doc_type"]]
    assert r.summary([["doc_type"], []])["doc_type"] == 1
    with pytest.raises(ConfigError, match="already registered"):

        @register_task_resolver
        class Clash(TaskResolver):
            name = "doc_type"

            def resolve(self, samples, split):
                return []


USERS = [
    {
        "attributes": {"nationality": "ALD", "age": "18-30"},
        "behaviour": {"seconds": 10.0, "attempts": 1, "device": "mobile"},
    },
    {
        "attributes": {"nationality": "BRV", "age": None},
        "behaviour": {"seconds": 30.0, "attempts": None, "device": "desktop"},
    },
    None,
    {"attributes": {"nationality": "CST"}, "behaviour": {"seconds": 20.0, "attempts": 3}},
]


def test_user_encoder_fit_and_encode() -> None:
    enc = UserFeatureEncoder.fit(USERS)
    assert enc.n_attr == 2 and enc.attribute_names == ["age", "nationality"]
    assert enc.vocab_sizes == [2, 4]  # index 0 = missing/unseen
    assert enc.n_behaviour == 4  # attempts, seconds, device=desktop, device=mobile
    e = enc.encode(USERS[0])
    assert e["attributes"].dtype == torch.long and e["attributes"].tolist() == [1, 1]
    assert bool(e["mask"]) and e["behaviour_mask"].all()
    i = enc.behaviour_names.index("seconds")
    assert e["behaviour"][i] == pytest.approx((10.0 - 20.0) / (200.0 / 3) ** 0.5)
    assert e["behaviour"][enc.behaviour_names.index("device=mobile")] == 1.0
    assert e["behaviour"][enc.behaviour_names.index("device=desktop")] == 0.0
    # missing values are masked (and zero), never an unmasked zero
    e = enc.encode(USERS[3])
    assert e["attributes"][0] == 0 and not e["behaviour_mask"][enc.behaviour_names.index("device=mobile")]
    assert e["behaviour_mask"][enc.behaviour_names.index("attempts")]
    e = enc.encode(USERS[1])
    assert not e["behaviour_mask"][enc.behaviour_names.index("attempts")]
    e = enc.encode(None)
    assert not e["mask"] and not e["behaviour_mask"].any() and (e["attributes"] == 0).all()
    # an unseen category maps to 0 / masked
    e = enc.encode({"attributes": {"nationality": "ZZZ"}, "behaviour": {"device": "tablet"}})
    assert e["attributes"].tolist() == [0, 0] and not e["behaviour_mask"].any() and bool(e["mask"])


def test_user_encoder_state_round_trip() -> None:
    enc = UserFeatureEncoder.fit(USERS)
    state = json.loads(json.dumps(enc.state_dict()))  # JSON-able
    back = UserFeatureEncoder.from_state(state)
    assert back == enc and back.vocab_sizes == enc.vocab_sizes and back.behaviour_names == enc.behaviour_names
    for u in USERS:
        a, b = enc.encode(u), back.encode(u)
        for k in a:
            assert torch.equal(a[k], b[k])
    with pytest.raises(ConfigError, match="version"):
        UserFeatureEncoder.from_state({"attributes": {}})
