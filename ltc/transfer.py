"""Fine-tuning: start a model from a checkpoint or a pretrained name, choose what trains, freeze the rest.

Where a fine-tuning run starts (``load_init``): an ltc checkpoint file, or a name in ``ltc.models.PRETRAINED``
(e.g. ``chgnet-0.3.0``), whose weights come from an installed package and which has no property head yet: it
always gets fresh heads (``head="keep"`` is an error).

What trains (``freeze(model, strategy=…, n_unfrozen=…)``):

================  =====================================================================================
``all``           everything (Devi's best strategy)
``blocks``        the last ``n_unfrozen`` blocks + readout + heads; ``n_unfrozen = n_blocks`` also
                  trains the embedding, i.e. equals ``all``. This integer is what Optuna searches.
``last_layer``    the last ``Linear`` of each head only (Devi: ALIGNN's ``fc``); a head that was just
                  replaced (new property, ``head="new"``) trains whole, here and below
``new_head``      a fresh head ``readout_dim → 64 → 1`` (two Linears, no activation, as Devi's code),
                  everything else frozen
``two_body``      pair-interaction updates + the last layer. alignn: each ALIGNN layer's
                  ``node_update`` and every GCN layer (Devi's "2b"); chgnet: every block's atom
                  convolution; cgcnn and megnet: every block (all their message passing is two-body)
``three_body``    bond-angle updates + the last layer. alignn: each ALIGNN layer's line-graph
                  ``edge_update`` (Devi's "3b"); chgnet: the bond convolutions and angle updates on its
                  bond graph; cgcnn and megnet have none: an error
================  =====================================================================================

Freezing uses ``param.requires_grad_(False)`` (setting ``module.requires_grad`` freezes nothing), and
``CrystalGNN.train`` keeps the BatchNorm of frozen parts in eval mode, so their statistics stay too. A model's
``inert_modules`` (off the property path, e.g. CHGNet's energy head) stay frozen whatever the strategy.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from ltc import choices
from ltc.checkpoints import CheckpointError, load_checkpoint
from ltc.choices import PRETRAINED
from ltc.errors import ConfigError
from ltc.models import CrystalGNN, Head, build_model

NEW_HEAD_HIDDEN = (64,)  # Devi et al.: Linear(256, 64) → Linear(64, 1)


def check_strategy(model: CrystalGNN, strategy: str, n_unfrozen: int | None) -> None:
    """A ``ConfigError`` if ``strategy`` / ``n_unfrozen`` do not fit ``model`` (``ltc.choices.check_strategy``)."""
    choices.check_strategy(model.name, model.config, strategy, n_unfrozen)


def trainable_modules(model: CrystalGNN, strategy: str = "all", n_unfrozen: int | None = None) -> list[nn.Module]:
    """The modules ``strategy`` trains (see the module docstring)."""
    check_strategy(model, strategy, n_unfrozen)
    # A head that was just replaced (a new property) has random hidden layers: it trains whole, or
    # last_layer & co would fit one Linear on frozen random features.
    fresh = getattr(model, "fresh_heads", False)
    last_layers: list[nn.Module] = [model.heads] if fresh else [head.out for head in model.heads]
    if strategy == "all":
        return [model]
    if strategy == "blocks":
        assert n_unfrozen is not None
        parts: list[nn.Module] = [*list(model.blocks)[model.n_blocks - n_unfrozen :], model.readout, model.heads]
        return parts + ([model.embedding] if n_unfrozen == model.n_blocks else [])
    if strategy == "last_layer":
        return last_layers
    if strategy == "new_head":
        return [model.heads]
    if strategy == "two_body":
        return model.two_body_modules() + last_layers
    return model.three_body_modules() + last_layers  # three_body


def freeze(model: CrystalGNN, *, strategy: str = "all", n_unfrozen: int | None = None) -> CrystalGNN:
    """Make only what ``strategy`` trains require gradients (in place); returns ``model``.

    The model's ``inert_modules`` stay frozen whatever the strategy ("all" included).
    """
    modules = trainable_modules(model, strategy, n_unfrozen)
    for p in model.parameters():
        p.requires_grad_(False)
    for module in modules:
        for p in module.parameters():
            p.requires_grad_(True)
    for module in model.inert_modules():
        for p in module.parameters():
            p.requires_grad_(False)
    model.train(model.training)  # re-apply the frozen-BatchNorm rule
    return model


def replace_heads(model: CrystalGNN, n_targets: int, *, hidden: tuple[int, ...], activation: str) -> CrystalGNN:
    """Give ``model`` ``n_targets`` fresh heads of the given shape, and record them in its config."""
    device = next(model.parameters()).device
    model.heads = nn.ModuleList(
        Head(model.readout_dim, hidden=hidden, activation=activation) for _ in range(n_targets)
    ).to(device)
    model.config = dataclasses.replace(
        model.config, n_targets=n_targets, head_hidden=hidden, head_activation=activation
    )
    model.fresh_heads = True
    return model


def model_from_checkpoint(
    ckpt: dict[str, Any],
    *,
    n_targets: int,
    strategy: str = "all",
    head: str = "auto",
) -> CrystalGNN:
    """Rebuild the checkpoint's model with its weights, and fit its heads to the fine-tuning task.

    ``head``: ``keep`` the trained head(s) (needs the same number of targets), ``new`` (fresh heads of
    the same shape), or ``auto``: keep when the number of targets matches, else new (a multi-property
    model fine-tuned on one property gets a fresh head). Strategy ``new_head`` always puts Devi's new
    head on. A checkpoint with no targets (a pretrained model, see ``pretrained_checkpoint``) has no head
    worth keeping: it always gets fresh ones.
    """
    if head not in ("auto", "keep", "new"):
        raise ConfigError(f"head={head!r} must be 'auto', 'keep' or 'new'")
    spec = ckpt["model"]
    model = build_model(spec["name"], spec["config"])
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint weights do not fit a {spec['name']} with its own config: {err}") from err
    same = model.config.n_targets == n_targets
    headless = "targets" in ckpt and not ckpt["targets"]  # trained on no property: its head is random
    if head == "keep" and headless:
        raise ConfigError(f"head='keep': the {spec['name']} model to start from has no property head to keep")
    if head == "keep" and not same:
        raise ConfigError(f"head='keep' needs {model.config.n_targets} target(s) as in the checkpoint, got {n_targets}")
    if strategy == "new_head":
        replace_heads(model, n_targets, hidden=NEW_HEAD_HIDDEN, activation="none")
    elif head == "new" or not same or headless:
        replace_heads(model, n_targets, hidden=model.config.head_hidden, activation=model.config.head_activation)
    return model


def pretrained_checkpoint(name: str) -> dict[str, Any]:
    """Pretrained model ``name`` (a key of ``ltc.models.PRETRAINED``) as an in-memory checkpoint dict.

    Its fields are those of a checkpoint file (``ltc.checkpoints``), with no ``targets`` (no property head
    was trained) and one ``history`` entry naming the weights it was loaded from.
    """
    try:
        entry = PRETRAINED[name]
    except KeyError:
        raise ConfigError(f"unknown pretrained model {name!r}; known: {', '.join(PRETRAINED)}") from None
    model, graph, source = entry.load()
    return {
        "model": {"name": model.name, "config": model.config.to_dict()},
        "state_dict": model.state_dict(),
        "graph": graph.to_dict(),
        "targets": [],
        "history": [{"stage": 0, "pretrained": name, "datasets": [], "init": None, **source}],
        "metrics": {},
    }


def load_init(init: str, *, model: str | None = None) -> dict[str, Any]:
    """Where a fine-tuning run starts: a pretrained name (``ltc.models.PRETRAINED``; these win over a file of
    the same name, which ``./NAME`` reaches) or a checkpoint file. ``model`` checks the architecture."""
    if str(init) not in PRETRAINED:
        return load_checkpoint(init, model=model)
    ckpt = pretrained_checkpoint(str(init))
    if model is not None and ckpt["model"]["name"] != model:
        raise CheckpointError(f"{init} is a pretrained {ckpt['model']['name']} model, not {model}")
    return ckpt
