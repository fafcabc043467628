"""Architecture families: one folder each, ``mone_train/families/<family>/``.

A family folder holds everything that makes a family itself:

    arch.yaml     its MoE recipe: the ``model.*`` settings that ``arch=<family>`` selects
                  (router, balancing, shared experts, dense layers, attention details,
                  expert granularity); sizes come from the ``model`` group
    __init__.py   ``FAMILY``: its Hugging Face mapping (:class:`mone_train.families.base.Family`)

Nothing else names families: the Hydra ``arch`` group, ``model.family``'s validation, export
and import all read this folder, so adding a family means adding a folder.
"""

from __future__ import annotations

import importlib
from pathlib import Path

FAMILIES_DIR = Path(__file__).resolve().parent
ARCH_FILE = "arch.yaml"


def family_names() -> list[str]:
    """The families, one per folder holding an ``arch.yaml``."""
    return sorted(p.name for p in FAMILIES_DIR.iterdir() if (p / ARCH_FILE).is_file())


def register_arch_configs() -> None:
    """Each family's ``arch.yaml`` as an option of Hydra's ``arch`` group, merged into ``model``."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    store = ConfigStore.instance()
    for name in family_names():
        node = OmegaConf.load(FAMILIES_DIR / name / ARCH_FILE)
        store.store(group="arch", name=name, node=node, package="model")


def load_family(name: str):
    """The :class:`~mone_train.families.base.Family` of ``name`` (imports its folder)."""
    if name not in family_names():
        raise ValueError(f"unknown family {name!r}: expected one of {family_names()}")
    return importlib.import_module(f"mone_train.families.{name}").FAMILY
