"""What a checkpoint holds and how it is written and read.

Two layouts, named in the manifest's ``weights`` field:

``full`` (a loadable model)::

    model/                      save_pretrained model + tokenizer (loadable as is)
    trainer_state.pt            optimizer (by parameter name), RNG state (the LR is a function of the step)
    tunefleet_checkpoint.json   step, epoch, hyperparameters, metrics, layout

``trained`` (what moved since the pretrained model, for PBT exploits)::

    trained_weights.safetensors every parameter this lineage ever trained
    trainer_state.pt
    tunefleet_checkpoint.json   ... plus base_model, label_names, trained_params

``deepspeed`` (a DeepSpeed engine's own checkpoint, every rank's ZeRO shards)::

    deepspeed/                  engine.save_checkpoint (see trainers.ds_engine)
    trainer_state.pt            RNG state
    tunefleet_checkpoint.json   ... plus world_size, zero_stage, trainable (names)

Every manifest lists the files written beside it with their size and SHA-256
(``files``); ``verify`` checks them before anything is loaded, so a truncated or
corrupted checkpoint is refused with the file named, never half-loaded. (Under
DeepSpeed the list holds rank 0's files: the other ranks' shards are written by
their own processes.)

Frozen blocks still hold the pretrained weights, so a ``trained`` checkpoint is
the base model plus a delta: a restore builds the base model and loads the
delta over it. A parameter that trained once and is frozen now (PBT lowered the
depth) differs from the base and stays in the delta.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal

# torch is imported where a function needs it: the file names below are read by processes
# that never touch a tensor (the run's export leader, through tune_jobs.layout).
if TYPE_CHECKING:
    import torch

MODEL_DIR = "model"
TRAINED_WEIGHTS = "trained_weights.safetensors"
STATE_FILE = "trainer_state.pt"
MANIFEST = "tunefleet_checkpoint.json"
ADAPTER_DIR = "adapter"  # in an export of a LoRA trial: the adapter alone (peft's folder)

Layout = Literal["full", "trained", "deepspeed"]


class CorruptCheckpoint(RuntimeError):
    """A checkpoint whose files do not match its manifest (truncated, changed, missing)."""


def file_digests(path: str) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of every file under ``path`` but the manifest, by relative path."""
    out = {}
    for root, _, names in os.walk(path):
        for name in sorted(names):
            full = os.path.join(root, name)
            rel = os.path.relpath(full, path)
            if rel == MANIFEST:
                continue
            out[rel] = {"bytes": os.path.getsize(full), "sha256": sha256_of(full)}
    return out


def verify(path: str, parts: Iterable[str] | None = None) -> dict[str, Any]:
    """The manifest, once every file it lists (under ``parts``, relative paths or folders;
    default all) is there with its size and SHA-256; else ``CorruptCheckpoint`` naming the
    file. A manifest that does not parse is corrupt too."""
    try:
        manifest = read_manifest(path)
    except (OSError, ValueError) as exc:
        raise CorruptCheckpoint(f"checkpoint {path}: its manifest does not read ({exc})") from exc
    wanted = None if parts is None else tuple(parts)
    for rel, want in (manifest.get("files") or {}).items():
        if wanted is not None and not any(
            rel == p or rel.startswith(p.rstrip("/") + "/") for p in wanted
        ):
            continue
        full = os.path.join(path, rel)
        if not os.path.exists(full):
            raise CorruptCheckpoint(f"checkpoint {path}: {rel} is missing")
        size = os.path.getsize(full)
        if size != want["bytes"]:
            raise CorruptCheckpoint(
                f"checkpoint {path}: {rel} has {size} bytes, the manifest says {want['bytes']} "
                "(truncated?)"
            )
        if sha256_of(full) != want["sha256"]:
            raise CorruptCheckpoint(f"checkpoint {path}: {rel} does not match its SHA-256")
    return manifest


def sha256_of(full: str) -> str:
    """The SHA-256 of one file, read in 4 MiB chunks."""
    import hashlib

    digest = hashlib.sha256()
    with open(full, "rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(
    path: str,
    *,
    model: Any,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    step: int,
    epoch: float,
    hparams: Mapping[str, Any],
    metrics: Mapping[str, Any],
    layout: Layout = "full",
    trained: Iterable[str] = (),
    base_model: str | None = None,
    label_names: list[str] | None = None,
    extra: Mapping[str, Any] | None = None,
    weights_only: bool = False,
    task: str = "sequence_classification",
    precision: str = "fp32",
) -> int:
    """Write everything needed to continue training; return the bytes written.

    ``trained`` names the parameters that differ from ``base_model`` (used by the
    ``trained`` layout, recorded by both). ``weights_only`` leaves ``trainer_state.pt``
    (optimizer, RNG) out: an export candidate, not a point to resume from exactly.
    ``precision``: the arithmetic its metrics were computed in (the export is re-scored in
    it, so the two compare).
    """
    os.makedirs(path, exist_ok=True)
    trained = sorted(set(trained))
    if layout == "deepspeed":
        pass  # the engine has written deepspeed/ (every rank); this is rank 0's part
    elif layout == "full":
        from trainers.model import save_pretrained

        save_pretrained(model, os.path.join(path, MODEL_DIR))
        tokenizer.save_pretrained(os.path.join(path, MODEL_DIR))
    else:
        from safetensors.torch import save_file

        params = dict(model.named_parameters())
        # clone: safetensors refuses tensors that share storage (tied weights)
        save_file(
            {n: params[n].detach().contiguous().cpu().clone() for n in trained},
            os.path.join(path, TRAINED_WEIGHTS),
        )
    if not weights_only:
        _save_trainer_state(path, optimizer, layout)
    with open(os.path.join(path, MANIFEST), "w") as fh:
        json.dump(
            {
                "step": step,
                "epoch": epoch,
                "weights": layout,
                "resumable": not weights_only,
                "base_model": base_model,
                "task": task,
                "precision": precision,
                "label_names": label_names,
                "trained_params": trained,
                "hparams": dict(hparams),
                "metrics": dict(metrics),
                "files": file_digests(path),  # checked by verify() before any load
                **dict(extra or {}),
            },
            fh,
            indent=2,
            default=str,
        )
    return folder_bytes(path)


def _save_trainer_state(path: str, optimizer: torch.optim.Optimizer, layout: str) -> None:
    import torch

    torch.save(
        {
            # AdamW state keyed by parameter name, so a restore with another
            # trainable set (a new unfreeze depth) keeps what still applies.
            "optimizer_by_name": {}
            if layout == "deepspeed"
            else optimizer_state_by_name(optimizer),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        },
        os.path.join(path, STATE_FILE),
    )


def folder_bytes(path: str) -> int:
    """Total size of the files under ``path``."""
    return sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(path)
        for name in names
    )


def optimizer_state_by_name(optimizer: torch.optim.Optimizer) -> dict[str, dict[str, Any]]:
    """Per-parameter optimizer state keyed by the names in each group's ``names`` list."""
    import torch

    out = {}
    for group in optimizer.param_groups:
        for param, name in zip(group["params"], group["names"], strict=True):
            if param in optimizer.state:
                out[name] = {
                    k: v.detach().cpu() if torch.is_tensor(v) else v
                    for k, v in optimizer.state[param].items()
                }
    return out


def load_optimizer_state_by_name(
    optimizer: torch.optim.Optimizer, saved: Mapping[str, Mapping[str, Any]]
) -> tuple[int, int]:
    """Give every parameter that still trains its saved AdamW state; (kept, fresh) counts.

    The optimizer's own hyperparameters (LR, weight decay, groups) stay as built.
    """
    import torch

    kept = fresh = 0
    # fused AdamW keeps its step counter on the parameter's device; the others on the CPU
    fused = bool(optimizer.defaults.get("fused"))
    for group in optimizer.param_groups:
        for param, name in zip(group["params"], group["names"], strict=True):
            if name in saved:
                optimizer.state[param] = {
                    k: v.to(param.device) if torch.is_tensor(v) and (fused or v.dim() > 0) else v
                    for k, v in saved[name].items()
                }
                kept += 1
            else:
                fresh += 1
    return kept, fresh


def weights_fingerprint(tensors: Mapping[str, torch.Tensor], names: list[str]) -> str:
    """SHA-256 of the named tensors (float32, sorted by name): equal iff the weights are equal."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(names):
        digest.update(name.encode())
        digest.update(tensors[name].detach().float().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def read_manifest(path: str) -> dict[str, Any]:
    """The manifest of a checkpoint folder."""
    with open(os.path.join(path, MANIFEST)) as fh:
        return json.load(fh)


def trained_params(manifest: Mapping[str, Any], model: Any) -> set[str]:
    """Parameters that differ from the base model after restoring this checkpoint.

    Older full checkpoints do not say: then every parameter may differ.
    """
    if manifest.get("trained_params"):
        return set(manifest["trained_params"])
    return {n for n, _ in model.named_parameters()}


def load_weights(path: str, model: Any) -> None:
    """Load the checkpoint's weights into ``model`` in place.

    A ``full`` checkpoint must cover every parameter (buffers aside); a
    ``trained`` one is loaded over ``model``, which must be the base model it was
    trained from; a ``deepspeed`` one has its ZeRO shards merged (fp32).
    """
    from safetensors.torch import load_file

    manifest = read_manifest(path)
    layout = manifest.get("weights", "full")
    if layout == "deepspeed":
        load_deepspeed_weights(path, manifest, model)
        return
    if layout == "trained":
        weights = load_file(os.path.join(path, TRAINED_WEIGHTS))
        names = {n for n, _ in model.named_parameters()}
        unknown = sorted(set(weights) - names)
        if unknown:
            raise RuntimeError(
                f"checkpoint {path} does not match the model: unknown parameters {unknown[:5]}"
            )
        model.load_state_dict(weights, strict=False)
        return
    weights = load_file(os.path.join(path, MODEL_DIR, "model.safetensors"))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or [k for k in missing if not k.endswith("position_ids")]:
        raise RuntimeError(
            f"checkpoint {path} does not match the model: missing={missing[:5]} "
            f"unexpected={unexpected[:5]}"
        )


def load_trainer_state(path: str, optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    """Restore AdamW state for every parameter that still trains, and the RNG state.

    Returns (tensors whose state was restored, tensors that start fresh).
    """
    import torch

    state = torch.load(os.path.join(path, STATE_FILE), weights_only=True)  # no pickle
    kept, fresh = load_optimizer_state_by_name(optimizer, state["optimizer_by_name"])
    _set_rng(state)
    return kept, fresh


def restore_rng(path: str) -> None:
    """The RNG state of a checkpoint's ``trainer_state.pt`` (its optimizer state left alone)."""
    import torch

    _set_rng(torch.load(os.path.join(path, STATE_FILE), weights_only=True))


def _set_rng(state: Mapping[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng"])


def materialize(path: str, dest: str, trust_remote_code: bool = False) -> None:
    """Write a loadable Hugging Face model folder (weights, config, tokenizer) for a checkpoint.

    A ``full`` checkpoint's ``model/`` is that folder already; a ``trained`` one is
    rebuilt from its base model, label names and hyperparameters (dropout), then
    the delta is loaded over it.
    """
    import shutil

    layout = read_manifest(path).get("weights", "full")
    from trainers.ds_engine import DS_DIR

    # never export a corrupt checkpoint: the weights' files, checked against the manifest
    manifest = verify(
        path, {"full": [MODEL_DIR], "trained": [TRAINED_WEIGHTS]}.get(layout, [DS_DIR])
    )
    if layout == "full":
        shutil.copytree(os.path.join(path, MODEL_DIR), dest, dirs_exist_ok=True)
        return
    from trainers import adapters
    from trainers.model import build_model, build_tokenizer, resolve_model_path, save_pretrained

    base = resolve_model_path(manifest["base_model"])
    hparams = manifest["hparams"]
    task = manifest.get("task") or "sequence_classification"
    model = build_model(base, manifest["label_names"], hparams, trust_remote_code, task)
    if adapters.enabled(hparams.get("adapter")):
        model = adapters.attach(model, hparams["adapter"])
        load_weights(path, model)
        adapters.export(model, dest, os.path.join(dest, ADAPTER_DIR))
    else:
        load_weights(path, model)
        save_pretrained(model, dest)
    build_tokenizer(base, trust_remote_code).save_pretrained(dest)


def load_deepspeed_weights(path: str, manifest: Mapping[str, Any], model: Any) -> None:
    """Merge a DeepSpeed checkpoint's shards into ``model`` (fp32)."""
    import torch

    from trainers.ds_engine import DS_DIR, DS_TAG, merged_state_dict, weights_only_loads

    if int(manifest.get("zero_stage", 0)) == 0:  # nothing sharded: the module's own states
        states = os.path.join(path, DS_DIR, DS_TAG, "mp_rank_00_model_states.pt")
        with weights_only_loads():
            weights = torch.load(states, map_location="cpu", weights_only=True)["module"]
    else:
        weights = merged_state_dict(path)
    weights = {k: v.float() for k, v in weights.items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or [k for k in missing if not k.endswith("position_ids")]:
        raise RuntimeError(
            f"DeepSpeed checkpoint {path} does not match the model: missing={missing[:5]} "
            f"unexpected={unexpected[:5]}"
        )
