"""Self-describing checkpoints: ``model.safetensors`` + ``manifest.json`` in one directory.

The manifest carries everything needed to rebuild and serve the net without other files:
architecture config (anchors, overrides, stitch-space options), the stitch table with costs and
accuracies, labels, preprocessing, latency profiles with their device fingerprints, and the
sha256 of the weights file. Loading verifies the schema and the hash before touching the
weights, and never unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import safetensors.torch
import timm
import torch

from .profile import DeviceFingerprint, LatencyProfile, StitchCost, stitch_costs
from .snnet import SNNet, SNNetConfig, snnet_from_config

SCHEMA_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names the file and the fault."""


@dataclass
class Manifest:
    """Contents of ``manifest.json``. Unknown keys are an error, as in a config."""

    family: str
    config: SNNetConfig
    stitches: list[dict[str, Any]]  # id, description, anchors, cut, gflops, params_m, accuracy
    labels: list[str]
    preprocessing: dict[str, Any]
    weights_sha256: str = ""
    profiles: list[LatencyProfile] = field(default_factory=list)
    evaluation: dict[str, Any] = field(
        default_factory=dict
    )  # dataset/split the accuracies are from
    training: dict[str, Any] = field(default_factory=dict)  # how the weights were made
    versions: dict[str, str] = field(default_factory=dict)
    created: str = ""
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "family": self.family,
            "config": self.config.to_dict(),
            "weights_sha256": self.weights_sha256,
            "labels": self.labels,
            "preprocessing": self.preprocessing,
            "stitches": self.stitches,
            "profiles": [p.to_dict() for p in self.profiles],
            "evaluation": self.evaluation,
            "training": self.training,
            "versions": self.versions,
            "created": self.created,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        allowed = set(cls.__dataclass_fields__)
        unknown = set(d) - allowed
        if unknown:
            raise ValueError(f"unknown manifest keys {sorted(unknown)}")
        missing = {"family", "config", "stitches", "labels", "preprocessing"} - set(d)
        if missing:
            raise ValueError(f"missing manifest keys {sorted(missing)}")
        d = dict(d)
        d["config"] = SNNetConfig.from_dict(d["config"])
        d["profiles"] = [LatencyProfile.from_dict(p) for p in d.get("profiles", [])]
        return cls(**d)

    def accuracy(self) -> dict[int, float]:
        """Stitch id -> top-1 accuracy (percent), for the stitches that have one."""
        return {s["id"]: s["accuracy"] for s in self.stitches if s.get("accuracy") is not None}

    def profile_for(self, fingerprint: DeviceFingerprint) -> LatencyProfile | None:
        for p in self.profiles:
            if p.fingerprint == fingerprint:
                return p
        return None

    def set_profile(self, profile: LatencyProfile) -> None:
        """Add a profile, replacing one measured on the same fingerprint."""
        self.profiles = [p for p in self.profiles if p.fingerprint != profile.fingerprint]
        self.profiles.append(profile)


def stitch_table(net: SNNet, costs: list[StitchCost] | None = None) -> list[dict[str, Any]]:
    """The manifest's stitch table: one row per stitch, in id order, accuracy unknown."""
    costs = stitch_costs(net) if costs is None else costs
    names = net.anchor_names
    return [
        {
            "id": s.id,
            "description": s.description,
            "anchors": [names[a] for a in s.anchors],
            "cut": list(s.cut) if s.cut else None,
            "layer": [s.pair, s.layer] if s.cut else None,
            "gflops": c.gflops,
            "params_m": c.params_m,
            "accuracy": None,
        }
        for s, c in zip(net.stitches, costs, strict=True)
    ]


def new_manifest(net: SNNet, labels: list[str] | None = None, **fields: Any) -> Manifest:
    """A manifest for ``net``: costs counted now, labels ``"0".."n-1"`` unless given."""
    labels = [str(i) for i in range(net.num_classes)] if labels is None else list(labels)
    if len(labels) != net.num_classes:
        raise ValueError(
            f"{len(labels)} labels for a net with {net.num_classes} classes (anchors built "
            f'from timm have its default head; give --overrides \'{{"num_classes": '
            f"{len(labels)}}}' for {len(labels)} classes)"
        )
    return Manifest(
        family=net.family,
        config=net.config,
        stitches=stitch_table(net),
        labels=labels,
        preprocessing=net.data_config(),
        **fields,
    )


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; checkpoints are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_manifest(directory: str | os.PathLike[str], manifest: Manifest) -> Path:
    """Write ``manifest.json`` atomically (the weights file is not touched)."""
    path = Path(directory) / MANIFEST_FILE

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(manifest.to_dict(), f, indent=1)
            f.write("\n")

    _atomic_write(path, write)
    return path


def save(
    net: SNNet, directory: str | os.PathLike[str], manifest: Manifest | None = None
) -> Manifest:
    """Save ``net`` as ``directory/model.safetensors`` + ``directory/manifest.json``.

    Args:
        net: The SN-Net (saved in float32 whatever its dtype).
        directory: Created if missing.
        manifest: Metadata to write (labels, accuracies, profiles...); a new one if None.
            Its hash, versions and creation time are filled in here.

    Returns:
        The manifest as written.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    manifest = new_manifest(net) if manifest is None else manifest
    state = {
        k: v.detach().to("cpu", torch.float32).contiguous() for k, v in net.state_dict().items()
    }
    _atomic_write(
        d / WEIGHTS_FILE,
        lambda tmp: safetensors.torch.save_file(state, tmp, metadata={"format": "pt"}),
    )
    manifest.weights_sha256 = sha256_file(d / WEIGHTS_FILE)
    manifest.versions = {"torch": torch.__version__, "timm": timm.__version__}
    manifest.created = datetime.now(UTC).isoformat(timespec="seconds")
    write_manifest(d, manifest)
    return manifest


def read_manifest(directory: str | os.PathLike[str]) -> Manifest:
    """Read and validate ``directory/manifest.json`` (schema only; the weights are not read)."""
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint directory {d} does not exist (or is not a directory)")
    path = d / MANIFEST_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{path} is missing; a checkpoint needs {MANIFEST_FILE} and {WEIGHTS_FILE}"
        )
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} must hold a JSON object, found {type(raw).__name__}")
    version = raw.get("schema_version")
    if version != SCHEMA_VERSION:
        raise CheckpointError(
            f"{path} has schema_version {version!r}; this snnet-serve reads schema_version "
            f"{SCHEMA_VERSION}"
        )
    try:
        return Manifest.from_dict(raw)
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{path} is malformed: {e}") from None


def _checked_weights(d: Path, manifest: Manifest) -> bytes:
    weights = d / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights} is missing")
    data = weights.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != manifest.weights_sha256:
        raise CheckpointError(
            f"{weights} does not match its manifest: sha256 {digest[:16]}... but "
            f"{MANIFEST_FILE} records {manifest.weights_sha256[:16] or '(none)'}...; the file "
            "is corrupt or was changed after saving"
        )
    return data


def verify(directory: str | os.PathLike[str]) -> Manifest:
    """Check a checkpoint without building the net: manifest schema, weights present, sha256.

    Raises:
        CheckpointError: naming the file and what is wrong with it.
    """
    manifest = read_manifest(directory)
    _checked_weights(Path(directory), manifest)
    return manifest


def load(directory: str | os.PathLike[str]) -> tuple[SNNet, Manifest]:
    """Load a checkpoint saved by ``save``: the SN-Net (float32, CPU, eval mode) and its manifest.

    Raises:
        CheckpointError: a file is missing, the manifest is malformed or of another schema,
            the weights' sha256 differs from the manifest's, or the tensors do not fit the
            architecture. The message names the file.
    """
    d = Path(directory)
    weights = d / WEIGHTS_FILE
    manifest = read_manifest(d)
    data = _checked_weights(d, manifest)  # hashed and parsed from the same bytes
    try:
        state = safetensors.torch.load(data)
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{weights} is not a readable safetensors file: {e}") from None
    try:
        net = snnet_from_config(manifest.config)
    except (ValueError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"{d / MANIFEST_FILE}: cannot build its SN-Net: {e}") from None
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise CheckpointError(
            f"{weights} does not fit the architecture in {MANIFEST_FILE}: {e}"
        ) from None
    if missing or unexpected:
        raise CheckpointError(
            f"{weights} does not fit the architecture in {MANIFEST_FILE}: "
            f"missing {sorted(missing)[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {sorted(unexpected)[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    if len(manifest.stitches) != len(net.stitches):
        raise CheckpointError(
            f"{d / MANIFEST_FILE} lists {len(manifest.stitches)} stitches but its config gives "
            f"{len(net.stitches)}"
        )
    return net.eval(), manifest
