"""Reliability and safety: pre-flight data scans, skip reports, a resumable sampler, atomic and preemption
checkpoints, and the non-finite-loss guard's error type. See docs/reliability.md."""

from idrecog.reliability.callbacks import (
    AtomicCheckpointIO,
    NonFiniteLossError,
    PreemptionCheckpoint,
    SkipReport,
)
from idrecog.reliability.preflight import PreflightResult, classify_problem, preflight_scan
from idrecog.reliability.sampler import ResumableRandomSampler

__all__ = [
    "AtomicCheckpointIO",
    "NonFiniteLossError",
    "PreemptionCheckpoint",
    "PreflightResult",
    "ResumableRandomSampler",
    "SkipReport",
    "classify_problem",
    "preflight_scan",
]
