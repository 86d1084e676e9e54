"""The command line of every script: each recipe subcommand parses to exactly its recipe, and no subcommand means
the first recipe (the paper's headline run)."""

import dataclasses
import typing

import pytest

import empssl_cifar
import groco_imagenet
import slimclr_moco
import swav_imagenet
import tec_mae

SCRIPTS = {"swav": swav_imagenet, "groco": groco_imagenet, "slimclr": slimclr_moco, "tec": tec_mae}


def subcommands(module) -> dict:
    """name -> recipe of every subcommand in the script's tyro Union (each Annotated[Args, subcommand(...)])."""
    union = module.SUBCOMMANDS if hasattr(module, "SUBCOMMANDS") else module.RECIPES
    found = {}
    for annotated in typing.get_args(union):
        conf = next(m for m in typing.get_args(annotated)[1:] if hasattr(m, "default") and hasattr(m, "name"))
        found[conf.name] = conf.default
    return found


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_subcommand_parses_to_its_recipe(script):
    module = SCRIPTS[script]
    recipes = subcommands(module)
    assert len(recipes) >= 2
    for name, recipe in recipes.items():
        parsed = module.parse_args([name])
        assert isinstance(parsed, module.Args)
        diff = {f.name: (getattr(parsed, f.name), getattr(recipe, f.name)) for f in dataclasses.fields(recipe)
                if getattr(parsed, f.name) != getattr(recipe, f.name)}  # fmt: skip
        assert not diff, (script, name, diff)
    first = next(iter(recipes.values()))
    assert module.parse_args([]) == first  # no subcommand: the headline recipe, as it is
    # a flag overrides the recipe and nothing else
    name, recipe = list(recipes.items())[-1]
    assert module.parse_args([name, "--seed", "123"]) == dataclasses.replace(recipe, seed=123)


def test_tec_pretrain_keeps_its_seed():
    """The bug this guards: tyro.cli(..., default=Args()) gave `tec_mae.py pretrain` the seed 0 of Args()."""
    assert tec_mae.parse_args(["pretrain"]).seed == 5 == tec_mae.parse_args([]).seed
    assert tec_mae.Args().seed == 0


def test_empssl_parses_its_defaults():
    assert empssl_cifar.parse_args([]) == empssl_cifar.Args()
    assert empssl_cifar.parse_args(["--lr", "0.1"]).lr == 0.1
    # --init FILE: released weights, as in every script; the initialisation scheme is --weight-init
    assert empssl_cifar.parse_args(["--init", "1.pt", "--weight-init", "kachayev"]).init == "1.pt"
