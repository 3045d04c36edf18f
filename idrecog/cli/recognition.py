"""``idrecog recognize``, ``idrecog export`` and ``idrecog serve`` (jsonargparse parsers)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser

from idrecog.errors import ConfigError, DataFormatError


def _rules_arg(value: str | None) -> str | None:
    """``default`` -> the shipped rule file; ``none`` -> no rules; else a path."""
    from idrecog.recognition.rules import default_rules_path

    if value is None or value.lower() == "none":
        return None
    if value == "default":
        return str(default_rules_path())
    return value


TASK_RESOLVER_HELP = (
    "which tasks each image gets: doc_type_head (default: the given doc type, else the model's doc-type head), "
    "gate (the model's gate decides), or a task classifier {task_classifier_ckpt: PATH, threshold: 0.5 or "
    "{task: p}, device: as --device} (docs/task-resolution.md)"
)
# what classify_images uses (mode, cache and loader settings are for datasets)
RESOLVER_KEYS = ("task_classifier_ckpt", "threshold", "device")
# resolvers that decide from the image batch and the model's outputs (not from dataset samples)
IMAGE_RESOLVERS = ("doc_type_head", "gate", "doc_type", "all")


def _check_task_resolver(spec: dict[str, Any] | str | None) -> dict[str, Any] | str | None:
    """Fail on bad ``--task_resolver`` arguments (a missing checkpoint included) before any model is loaded."""
    from idrecog.data.resolution.classifier import ClassifierResolver

    if spec is None or isinstance(spec, str):
        if spec is not None and spec not in IMAGE_RESOLVERS:
            raise ConfigError(
                f"--task_resolver: unknown resolver {spec!r}; choose one of {', '.join(IMAGE_RESOLVERS)} or a "
                "task classifier {task_classifier_ckpt: PATH, ...}"
            )
        return spec
    if not isinstance(spec, dict):
        raise ConfigError(
            f"--task_resolver must be a name ({', '.join(IMAGE_RESOLVERS)}) or a mapping "
            f"{{task_classifier_ckpt: PATH, ...}}, got {spec!r}"
        )
    kwargs = dict(spec)
    unknown = sorted(set(kwargs) - set(RESOLVER_KEYS))
    if unknown:
        raise ConfigError(
            f"--task_resolver: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(RESOLVER_KEYS)}"
        )
    ClassifierResolver.check_args(field="--task_resolver", **kwargs)
    return kwargs


def _attach_task_resolver(rec: Any, spec: dict[str, Any] | str | None, device: str) -> None:
    from idrecog.data.resolution import create_task_resolver
    from idrecog.data.resolution.classifier import ClassifierResolver

    if isinstance(spec, str):
        rec.task_resolver = create_task_resolver(spec, rec.catalogue)
    elif spec is not None:
        kwargs = {"device": device, **spec, "field": "--task_resolver"}
        rec.task_resolver = ClassifierResolver(rec.catalogue, **kwargs)


def _open_image(path: str, field: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise DataFormatError("image not found", file=path, field=field) from None
    except (UnidentifiedImageError, OSError) as e:
        raise DataFormatError(f"cannot decode image: {e}", file=path, field=field) from None


def recognize_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="idrecog recognize", description="Recognise document images; one JSON object per line."
    )
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--ckpt_path", required=True, help="unified-model checkpoint (idrecog fit)")
    p.add_argument("--flash", default=None, help="flash frame of the capture (applies to every image)")
    p.add_argument("--angles", nargs="+", default=None, help="angle frames of the capture")
    p.add_argument(
        "--user", default=None, help="user info: a JSON object {attributes, behaviour} or a .json file"
    )
    p.add_argument("--doc-type", "--doc_type", dest="doc_type", default=None, help="known document type")
    p.add_argument("--task_resolver", type=dict | str | None, default=None, help=TASK_RESOLVER_HELP)
    p.add_argument("--rules", default="default", help="rule file; 'default' (shipped) or 'none'")
    p.add_argument("--out", default=None, help="folder for segmentation masks (PNG)")
    p.add_argument("--batch_size", type=int, default=8, help="images per forward pass")
    p.add_argument("--device", default="cpu")
    return p


def recognize_main(argv: list[str]) -> int:
    args = recognize_parser().parse_args(argv)
    from idrecog.recognition.recognizer import RecognitionRequest, Recognizer

    resolver_kwargs = _check_task_resolver(args.task_resolver)

    user = None
    if args.user:
        text = (
            Path(args.user).read_text()
            if args.user.endswith(".json") and Path(args.user).is_file()
            else args.user
        )
        try:
            user = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--user: not valid JSON: {e}") from None
        if not isinstance(user, dict):
            raise ConfigError("--user must be a JSON object {attributes, behaviour}")
    rec = Recognizer.from_checkpoint(
        args.ckpt_path,
        map_location=args.device,
        rules=_rules_arg(args.rules),
        out_dir=args.out,
        batch_size=args.batch_size,
    )
    _attach_task_resolver(rec, resolver_kwargs, args.device)
    flash = _open_image(args.flash, "--flash") if args.flash else None
    angles = [_open_image(a, "--angles") for a in args.angles or []]
    requests = [
        RecognitionRequest(
            image=_open_image(p, "image"),
            id=Path(p).stem,
            flash=flash,
            angles=angles,
            user=user,
            doc_type=args.doc_type,
        )
        for p in args.images
    ]
    for record in rec.recognize(requests, images=list(args.images)):
        print(json.dumps(record), flush=True)
    return 0


def export_main(argv: list[str]) -> int:
    p = ArgumentParser(
        prog="idrecog export", description="Export the whole multi-task model as one artefact."
    )
    p.add_argument("--ckpt_path", required=True)
    p.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    p.add_argument("--out", required=True, help="output file (.onnx or .pt)")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--check", type=bool, default=True, help="ONNX: compare with PyTorch on random images")
    args = p.parse_args(argv)
    import torch

    from idrecog.lit.unified import load_unified
    from idrecog.recognition.export import export_model, onnx_parity, require_export_extra

    require_export_extra(args.format, check=args.check)  # before the (slow) checkpoint load
    module = load_unified(args.ckpt_path)
    info = export_model(module, args.out, args.format, opset=args.opset)
    if args.format == "onnx" and args.check:
        h, w = module.model.encoder.img_size
        diffs = onnx_parity(module, args.out, torch.randn(3, 3, h, w))
        info["max_abs_diff"] = max(diffs.values())
    print(json.dumps(info), file=sys.stdout)
    return 0


def serve_main(argv: list[str]) -> int:
    from idrecog.utils.extras import require_extra

    require_extra("serve", ("litserve", "fastapi", "uvicorn"), "idrecog serve")
    from idrecog.recognition.audit import AuditSettings, RetentionSettings
    from idrecog.recognition.serve import ServeLimits

    p = ArgumentParser(
        prog="idrecog serve",
        description="Serve POST /recognize (multipart, API key), GET /health, /ready and /metrics.",
    )
    p.add_argument("--ckpt_path", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--rules", default="default", help="rule file; 'default' (shipped) or 'none'")
    p.add_argument("--limits", type=ServeLimits, default=ServeLimits(), help="request limits and batching")
    p.add_argument(
        "--api_keys",
        default=None,
        help="file of API key hashes (`idrecog serve-key`); also read: the IDRECOG_API_KEYS variable",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="serve without API keys and without an audit log; refused unless --host is a loopback address",
    )
    p.add_argument(
        "--audit", type=AuditSettings, default=AuditSettings(), help="decision audit log (JSON lines)"
    )
    p.add_argument(
        "--retention",
        type=RetentionSettings,
        default=RetentionSettings(),
        help="keeping uploads (personal data); default: nothing is kept",
    )
    p.add_argument("--task_resolver", type=dict | str | None, default=None, help=TASK_RESOLVER_HELP)
    p.add_argument("--device", default="cpu")
    p.add_argument("--log_level", default="warning")
    args = p.parse_args(argv)
    from idrecog.recognition.audit import AuditLog, Retention
    from idrecog.recognition.auth import ApiKeyStore
    from idrecog.recognition.recognizer import Recognizer
    from idrecog.recognition.serve import is_loopback, serve

    resolver_kwargs = _check_task_resolver(args.task_resolver)
    limits = args.limits if isinstance(args.limits, ServeLimits) else ServeLimits(**dict(args.limits))
    audit_settings = (
        args.audit if isinstance(args.audit, AuditSettings) else AuditSettings(**dict(args.audit))
    )
    retention_settings = (
        args.retention
        if isinstance(args.retention, RetentionSettings)
        else RetentionSettings(**dict(args.retention))
    )
    # every setting is checked before the model is loaded
    keys = ApiKeyStore.from_sources(args.api_keys)
    if args.insecure:
        if keys is not None:
            raise ConfigError(
                "--insecure: API keys are configured (--api_keys or IDRECOG_API_KEYS); drop one"
            )
        if not is_loopback(args.host):
            raise ConfigError(
                f"--insecure: allowed on a loopback --host only (127.0.0.1, ::1), not {args.host}"
            )
    elif keys is None:
        raise ConfigError(
            "--api_keys: no API keys (give a key file, set IDRECOG_API_KEYS, or --insecure on 127.0.0.1); "
            "make one with `idrecog serve-key --id NAME --keys_file FILE`"
        )
    if audit_settings.path is None and not args.insecure:
        raise ConfigError("--audit.path: a file for the decision audit log is required (JSON lines)")
    retention = Retention.check(retention_settings)

    rec = Recognizer.from_checkpoint(
        args.ckpt_path,
        map_location=args.device,
        rules=_rules_arg(args.rules),
        batch_size=limits.max_batch_size,
    )
    _attach_task_resolver(rec, resolver_kwargs, args.device)
    audit = AuditLog(audit_settings, rec.provenance()) if audit_settings.path else None
    mode = "NO API KEYS (--insecure)" if keys is None else f"{len(keys.keys)} API key(s)"
    print(
        f"[idrecog] serving {args.ckpt_path} ({rec.provenance()['model']}) on http://{args.host}:{args.port} "
        f"with {mode}; audit log: {audit_settings.path or 'none'}; uploads kept: "
        f"{retention_settings.dir if retention is not None else 'none'}",
        flush=True,
    )
    try:
        serve(
            rec,
            host=args.host,
            port=args.port,
            limits=limits,
            log_level=args.log_level,
            keys=keys,
            insecure=args.insecure,
            audit=audit,
            retention=retention,
        )
    finally:
        if audit is not None:
            audit.close()
    return 0


def serve_key_main(argv: list[str]) -> int:
    from idrecog.recognition.auth import add_key, revoke_key

    p = ArgumentParser(
        prog="idrecog serve-key",
        description="Make an API key of `idrecog serve` (printed once; its SHA-256 is appended to the key "
        "file) or revoke one. A running server re-reads the file within a second.",
    )
    p.add_argument("--id", required=True, help="the key's public id (written to the audit log)")
    p.add_argument("--keys_file", required=True, help="the key file given to `idrecog serve --api_keys`")
    p.add_argument("--revoke", action="store_true", help="mark the key revoked (403) instead")
    args = p.parse_args(argv)
    if args.revoke:
        revoke_key(args.keys_file, args.id)
        print(f"[idrecog] revoked key {args.id!r} in {args.keys_file}", file=sys.stderr)
    else:
        key = add_key(args.keys_file, args.id)
        print(f"[idrecog] key {args.id!r} added to {args.keys_file}; it is shown only now:", file=sys.stderr)
        print(key)
    return 0
