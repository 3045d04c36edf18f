"""The unified multi-task model: encoder -> task decoder over task queries -> task-guided interpreter.

The data flow and shapes are drawn in docs/architecture.md. For a fixed task list the traced path has no
data-dependent Python control flow (export-friendly).
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Mapping
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from idrecog.errors import ConfigError
from idrecog.models.decoder import TaskDecoder
from idrecog.models.detail import DetailBranch, detail_mask
from idrecog.models.encoder import ViTEncoder
from idrecog.models.interpreter import Route, TaskGuidedInterpreter
from idrecog.models.pixel_decoder import PixelDecoder
from idrecog.models.queries import TaskQueryProvider
from idrecog.tasks.base import HeadContext, TaskType
from idrecog.tasks.catalogue import TaskCatalogue, coerce_catalogue, input_of
from idrecog.tasks.registry import create_task_type, is_task_type, list_task_types

__all__ = ["UnifiedModel", "build_task_types", "module_config", "module_from_config"]

M = TypeVar("M", bound=nn.Module)


def build_task_types(
    catalogue: TaskCatalogue, task_options: Mapping[str, Mapping[str, Any]] | None = None
) -> dict[str, TaskType]:
    """Instantiate each catalogue task's type. ``task_options`` is keyed by task TYPE (e.g. ``detection``)
    and, overriding it, by task NAME; both override the catalogue entry's ``options``.

    Options of a registered type the catalogue does not use are ignored, so one config (``detection:
    {num_queries: 16}``) serves every dataset; a key that is neither a registered type nor a task is an error.
    """
    task_options = dict(task_options or {})
    unknown = sorted(k for k in task_options if k not in catalogue.names and not is_task_type(k))
    if unknown:
        raise ConfigError(
            f"model.task_options names {unknown}, which are neither task types ({list_task_types()}) nor tasks "
            f"({catalogue.names}) of the catalogue"
        )
    out = {}
    for spec in catalogue:
        opts = {**dict(task_options.get(spec.type, {})), **dict(task_options.get(spec.name, {}))}
        out[spec.name] = create_task_type(spec, **opts)
    return out


def module_config(module: nn.Module) -> dict[str, Any]:
    """``{"class_path", "init_args"}`` of a module that records its ``init_args`` (jsonargparse's format)."""
    init_args = getattr(module, "init_args", None)
    if not isinstance(init_args, dict):
        raise ConfigError(
            f"{type(module).__qualname__} does not record its constructor arguments (an 'init_args' dict), "
            "so a checkpoint could not rebuild it"
        )
    cls = type(module)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dict(init_args)}


def module_from_config(value: Any, base: type[M], what: str) -> M | None:
    """An instance, None, or a ``{"class_path", "init_args"}`` dict (from hparams) -> an instance of ``base``.

    Only classes of modules already imported or inside ``idrecog`` are resolved, never arbitrary code named
    by a checkpoint.
    """
    if value is None or isinstance(value, base):
        return value
    if not isinstance(value, Mapping) or "class_path" not in value:
        raise ConfigError(
            f"{what}: expected a {base.__name__} or a class_path/init_args mapping, got {value!r}"
        )
    path = str(value["class_path"])
    mod_name, _, cls_name = path.rpartition(".")
    if mod_name not in sys.modules and not mod_name.startswith("idrecog."):
        raise ConfigError(f"{what}: refusing to import {mod_name!r} named by a config; import it first")
    try:
        cls = getattr(importlib.import_module(mod_name), cls_name)
    except (ImportError, AttributeError):
        raise ConfigError(f"{what}: cannot resolve class_path {path!r}") from None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigError(f"{what}: {path} is not a {base.__name__}")
    return cls(**dict(value.get("init_args") or {}))


class UnifiedModel(nn.Module):
    """Wires the parts together; see the module docstring for the data flow and shapes.

    Args:
        catalogue: the task catalogue (object, dict form or path).
        encoder: the image encoder.
        queries: the task query provider (built here for the catalogue).
        decoder: the task decoder (built here for the encoder width and patch grid).
        interpreter: the task-guided interpreter (built here with each task's head).
        task_options: per task TYPE (or task name) options for the task types, e.g. ``{"detection": {"num_queries": 16}}``.
        user_features: the DataModule's fitted ``UserFeatureEncoder`` state, for providers that embed user info.
        detail: a high-resolution branch whose tokens the queries of its tasks also read (None: none).
    """

    def __init__(
        self,
        catalogue: TaskCatalogue | Mapping[str, Any] | str,
        encoder: ViTEncoder,
        queries: TaskQueryProvider,
        decoder: TaskDecoder,
        interpreter: TaskGuidedInterpreter,
        task_options: Mapping[str, Mapping[str, Any]] | None = None,
        user_features: Mapping[str, Any] | None = None,
        detail: DetailBranch | None = None,
    ) -> None:
        super().__init__()
        self.catalogue = coerce_catalogue(catalogue)
        self.task_types = build_task_types(self.catalogue, task_options)
        self.query_counts = {t: int(tt.num_queries) for t, tt in self.task_types.items()}
        dim = decoder.dim
        self.encoder = encoder
        self.queries = queries
        self.decoder = decoder
        self.interpreter = interpreter
        # providers conditioned on frames / user info also get the encoder and the user vocabularies
        accepted = inspect.signature(queries.build).parameters
        extra = {"encoder": encoder, "user_spec": dict(user_features) if user_features else None}
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
            extra = {k: v for k, v in extra.items() if k in accepted}
        queries.build(self.catalogue, self.query_counts, dim, **extra)
        decoder.build(encoder.embed_dim, encoder.grid_size)
        interpreter.build(self.task_types, dim)
        self.detail = detail
        if detail is not None:
            detail.build(dim, encoder.img_size, self.catalogue.names)
        self.pixel_tasks = {t for t, tt in self.task_types.items() if tt.needs_pixel_features}
        self.pixel_decoder = (
            PixelDecoder(encoder.embed_dim, dim, encoder.grid_size) if self.pixel_tasks else None
        )

    @property
    def dim(self) -> int:
        return self.decoder.dim

    def task_slices(self, tasks: list[str]) -> dict[str, slice]:
        """Where each task's query tokens sit in the decoder's input and output."""
        out, start = {}, 0
        for t in tasks:
            out[t] = slice(start, start + self.query_counts[t])
            start += self.query_counts[t]
        return out

    def forward(
        self,
        images: Tensor,
        tasks: list[str] | None = None,
        batch: dict[str, Any] | None = None,
        route: Route = "known",
    ) -> dict[str, Any]:
        """images: [B, 3, H, W] -> {"outputs": {task: head outputs}, "gate_logits": {task: [B, n_types]},
        "open_logits": {task: [B]}, "routed": {task: bool [B]}, "available": {task: bool [B]} (tasks with
        required inputs), "task_feats": {task: [B, Q_t, D]}, "tokens": [B, L, E]} for ``tasks`` (default: all).
        ``tokens``: the encoder's output, the representation every task shares (gradient balancers read the task
        gradients there)."""
        tasks = list(self.catalogue.names if tasks is None else tasks)
        for t in tasks:
            if t not in self.query_counts:
                raise ConfigError(f"unknown task {t!r}; the model has: {', '.join(self.catalogue.names)}")
        b = images.shape[0]
        tokens = self.encoder(images)  # [B, L, E]
        pixel_hidden = None
        if self.pixel_decoder is not None and any(t in self.pixel_tasks for t in tasks):
            pixel_hidden = self.pixel_decoder.forward_hidden(tokens)  # [B, H/4, W/4, C], C << D
        slices = self.task_slices(tasks)
        q = self.queries(tasks, b, batch)  # [B, Q, D]
        extra = None
        if self.detail is not None and self.detail.reads(tasks):
            fine = self.detail(images)  # [B, L_d, D]
            mask = detail_mask(
                slices, self.detail.tasks, q.shape[1], tokens.shape[1], fine.shape[1], images.device
            )
            extra = (fine, self.detail.pos, mask)
        feats = self.decoder(q, tokens, slices, extra)  # [B, Q, D]
        task_feats = {t: feats[:, s] for t, s in slices.items()}
        ctx = HeadContext(
            pixel_feats=None,
            image_size=(int(images.shape[-2]), int(images.shape[-1])),
            pixel_hidden=pixel_hidden,
            pixel_decoder=self.pixel_decoder if pixel_hidden is not None else None,
        )
        available = self.inputs_at_hand(tasks, b, batch, images.device)
        outputs, gate_logits, open_logits, routed = self.interpreter(task_feats, ctx, route, available)
        return {
            "outputs": outputs,
            "gate_logits": gate_logits,
            "open_logits": open_logits,
            "routed": routed,
            "available": available,
            "task_feats": task_feats,
            "tokens": tokens,
        }

    def inputs_at_hand(
        self, tasks: list[str], b: int, batch: dict[str, Any] | None, device: Any
    ) -> dict[str, Tensor]:
        """{task: bool [B]} for the tasks with catalogue ``requires``: whether each sample supplies those inputs and
        the queries read them (a design that reads no frames never has a hologram's frames at hand; a session
        without the user's declared details never has the nationality check's ``user.attributes``)."""
        out: dict[str, Tensor] = {}
        batch = batch or {}
        assoc, user = batch.get("assoc"), batch.get("user")
        for t in tasks:
            need = set(self.catalogue[t].requires)
            if not need:
                continue
            inputs = {input_of(r) for r in need}
            if (
                not self.queries.reads(need)
                or ("user" in inputs and user is None)
                or (inputs - {"user"} and assoc is None)
            ):
                out[t] = torch.zeros(b, dtype=torch.bool, device=device)
                continue
            ok = torch.ones(b, dtype=torch.bool, device=device)
            if "flash" in need:
                ok = ok & assoc["mask"][:, 0].to(device).bool()
            if "angles" in need:
                ok = ok & assoc["mask"][:, 1:].to(device).bool().any(1)
            if "user" in inputs:
                ok = ok & user["mask"].to(device).bool()
            if "user.attributes" in need:  # index 0: missing
                ok = ok & (user["attributes"].to(device) > 0).any(1)
            if "user.behaviour" in need:
                ok = ok & user["behaviour_mask"].to(device).bool().any(1)
            out[t] = ok
        return out
