"""Every recipe in recipes/ loads, validates offline with --dry-run, opens with its command, and every dataset it names
has a data card in data_cards/."""

from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import config_to_dict, flatten, load_config
from pipeline.publish import DATASET_KEYS, find_data_cards

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def datasets_named(recipe: Path) -> list[str]:
    """The datasets a recipe names (every `*.dataset`, `*.input`, `*.prompts`, ... key that is set)."""
    settings = flatten(config_to_dict(load_config(recipe)))
    keys = [k for k in settings if k.split(".")[-1] in DATASET_KEYS and k.split(".")[0] != "world"]
    return sorted({settings[k] for k in keys if isinstance(settings[k], str) and settings[k] not in ("", "collect")})


def test_the_recipes_folder_holds_the_documented_recipes():
    assert {p.name for p in RECIPES} >= {"demo.yaml", "gpu.yaml", "llama-125m-fineweb.yaml"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_validates_offline_and_opens_with_its_command(recipe, capsys, tmp_path):
    text = recipe.read_text()
    assert text.startswith("#") and f"recipes/{recipe.name}" in text.split("\n\n")[0], "opening comment with command"
    main(["run", str(recipe), f"run_dir={tmp_path / 'run'}", "--dry-run"])
    out = capsys.readouterr().out
    assert out.startswith(f"recipe {recipe} is valid")
    assert all(f"  {stage} " in out for stage in ("webtext", "pretrain", "sft", "reward", "ppo"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_dataset_a_recipe_names_has_a_data_card(recipe):
    names = datasets_named(recipe)
    assert names, f"{recipe.name} names no dataset"
    cards, missing = find_data_cards(names, REPO / "data_cards")
    assert not missing, f"{recipe.name}: no card in data_cards/ for {missing}"
    for _, card in cards:
        text = card.read_text()
        assert text.startswith("# ") and "## " in text
