"""Exports: the export store (claim check for exported records) and access bundles."""

from .bundle import BUNDLE_FORMAT, BundleError, build_bundle, read_bundle
from .store import (
    ArtifactNotFound,
    ExportError,
    ExportStore,
    InvalidKey,
    LocalExportStore,
    MemoryExportStore,
    ScopedExportStore,
    bundle_key,
    export_key,
    system_case_prefix,
    system_prefix,
    validate_key,
)

__all__ = [
    "BUNDLE_FORMAT",
    "ArtifactNotFound",
    "BundleError",
    "ExportError",
    "ExportStore",
    "InvalidKey",
    "LocalExportStore",
    "MemoryExportStore",
    "ScopedExportStore",
    "build_bundle",
    "bundle_key",
    "export_key",
    "read_bundle",
    "system_case_prefix",
    "system_prefix",
    "validate_key",
]
