"""``idrecog export``: the whole multi-task model as one artefact (ONNX or TorchScript).

Input ``images``: float [B, 3, H, W], normalised like the DataModule (ImageNet mean/std, resized to the model's
``img_size``); B is dynamic. Outputs are named ``<task>.<head output>`` (``doc_type.logits``,
``image_quality.value``, ``card_mask.mask_logits``, ``fields.logits``, ``fields.boxes`` ...) plus
``<task>.gate_logits`` and ``<task>.open_logits`` for the task-guided interpreter's gate (which unit, and
whether the task applies: open where sigmoid(open_logits) >= 0.5), every one with the batch as its first axis. The ONNX
file's metadata holds the catalogue (``idrecog.catalogue``, JSON) and the ImageNet mean/std, so it runs
without idrecog (see docs/recognition.md).

The exported graph is the image-conditioned path (``route="known"``: each task through its own output unit, the
gate's decisions as outputs for the consumer to apply). A model whose queries read associated frames or user
information cannot be exported (the command refuses with one line): the artefact takes images only, and the tasks
that require such inputs (catalogue ``requires``) are never to be answered from it.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from idrecog.errors import ConfigError

FORMATS = ("onnx", "torchscript")
# what ONNX export (torch.onnx, onnx metadata) and the parity check (onnxruntime) import: the 'export' extra
ONNX_MODULES = ("onnx", "onnxscript")
PARITY_MODULES = ("onnxruntime",)


def require_export_extra(fmt: str, check: bool = False) -> None:
    """One ConfigError line naming ``pip install 'idrecog[export]'`` when ``fmt`` needs a package that is missing."""
    from idrecog.utils.extras import require_extra

    if fmt == "onnx":
        modules = ONNX_MODULES + (PARITY_MODULES if check else ())
        require_extra("export", modules, "idrecog export --format onnx")


class ExportModule(nn.Module):
    """images: [B, 3, H, W] -> a flat tuple of every task's outputs, in the order of ``output_names``."""

    def __init__(self, model: nn.Module, tasks: list[str] | None = None) -> None:
        super().__init__()
        q = model.queries
        if q.consumes_frames or q.consumes_user:
            raise ConfigError(
                f"the model's queries ({type(q).__name__}) read associated frames or user information, which an "
                "exported graph of images alone cannot take; export a model whose queries read the image only "
                "(learned or text)"
            )
        self.model = model
        self.tasks = list(tasks if tasks is not None else model.catalogue.names)
        h, w = model.encoder.img_size
        with torch.no_grad():
            probe = model(torch.zeros(2, 3, h, w), tasks=self.tasks, route="known")
        self.keys: list[tuple[str, str]] = []
        for t in self.tasks:
            for k, v in probe["outputs"][t].items():
                if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == 2 and v.is_floating_point():
                    self.keys.append((t, k))
        self.gate_tasks = [t for t in self.tasks if t in (probe.get("gate_logits") or {})]

    @property
    def output_names(self) -> list[str]:
        gate = [f"{t}.gate_logits" for t in self.gate_tasks] + [f"{t}.open_logits" for t in self.gate_tasks]
        return [f"{t}.{k}" for t, k in self.keys] + gate

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        out = self.model(images, tasks=self.tasks, route="known")
        heads = [out["outputs"][t][k] for t, k in self.keys]
        gates = [out["gate_logits"][t] for t in self.gate_tasks]
        return (*heads, *gates, *[out["open_logits"][t] for t in self.gate_tasks])


def export_model(
    module: Any, out: str | Path, fmt: str = "onnx", opset: int = 17, batch_size: int = 2
) -> dict[str, Any]:
    """Write ``module`` (a ``UnifiedModule``) to ``out``; returns {"path", "format", "inputs", "outputs"}."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    require_export_extra(fmt)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval().cpu()
    wrapper = ExportModule(module.model).eval()
    h, w = module.model.encoder.img_size
    example = torch.randn(batch_size, 3, h, w)
    names = wrapper.output_names
    with warnings.catch_warnings():
        # tracing warns about Python ints taken from shapes; the batch axis stays dynamic (tested for parity)
        warnings.simplefilter("ignore")
        _write(wrapper, module, example, out, fmt, opset, names)
    return {"path": str(out), "format": fmt, "inputs": {"images": [None, 3, h, w]}, "outputs": names}


def _write(
    wrapper: ExportModule, module: Any, example: Tensor, out: Path, fmt: str, opset: int, names: list[str]
) -> None:
    if fmt == "torchscript":
        with torch.no_grad():
            traced = torch.jit.trace(wrapper, example, check_trace=False, strict=False)
        extra = {
            "output_names.json": json.dumps(names),
            "catalogue.json": json.dumps(module.catalogue.to_dict()),
        }
        torch.jit.save(traced, str(out), _extra_files=extra)
    else:
        axes = {"images": {0: "batch"}, **{n: {0: "batch"} for n in names}}
        with torch.no_grad():
            torch.onnx.export(
                wrapper,
                (example,),
                str(out),
                input_names=["images"],
                output_names=names,
                dynamic_axes=axes,
                opset_version=opset,
                dynamo=False,
            )
        _add_onnx_metadata(out, module)


def _add_onnx_metadata(path: Path, module: Any) -> None:
    import onnx

    from idrecog.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    model = onnx.load(str(path))
    meta = {
        "idrecog.catalogue": json.dumps(module.catalogue.to_dict()),
        "idrecog.img_size": json.dumps(list(module.model.encoder.img_size)),
        "idrecog.mean": json.dumps(list(IMAGENET_MEAN)),
        "idrecog.std": json.dumps(list(IMAGENET_STD)),
    }
    for k, v in meta.items():
        p = model.metadata_props.add()
        p.key, p.value = k, v
    onnx.save(model, str(path))


def onnx_parity(module: Any, path: str | Path, images: Tensor) -> dict[str, float]:
    """Max absolute difference per output between PyTorch and onnxruntime on ``images`` [B, 3, H, W]."""
    from idrecog.utils.extras import require_extra

    require_extra("export", PARITY_MODULES, "the ONNX parity check")
    import onnxruntime as ort

    wrapper = ExportModule(module.model).eval()
    with torch.no_grad():
        ref = wrapper(images)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"images": images.numpy()})
    names = [o.name for o in sess.get_outputs()]
    return {n: float((torch.from_numpy(g) - r).abs().max()) for n, g, r in zip(names, got, ref, strict=True)}
