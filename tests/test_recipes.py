"""Every recipe in recipes/ loads, validates offline with --dry-run, opens with its command, and every dataset it names
has a data card in data_cards/."""

from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import config_to_dict, flatten, load_config
from pipeline.publish import DATASET_KEYS, find_data_cards

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
# Starting from a chat model on the Hub: (recipe, base, SFT data, reward data, PPO prompts)
CHAT_RECIPES = {
    "qwen2.5-0.5b-instruct-ultrafeedback.yaml": (
        "Qwen/Qwen2.5-0.5B-Instruct",
        "HuggingFaceH4/ultrachat_200k",
        "openbmb/UltraFeedback",
        "openbmb/UltraFeedback",
    ),
    "smollm2-360m-instruct-ultrafeedback.yaml": (
        "HuggingFaceTB/SmolLM2-360M-Instruct",
        "HuggingFaceH4/ultrachat_200k",
        "HuggingFaceH4/ultrafeedback_binarized",
        "HuggingFaceH4/ultrafeedback_binarized",
    ),
}


def datasets_named(recipe: Path) -> list[str]:
    """The datasets a recipe names (every `*.dataset`, `*.input`, `*.prompts`, ... key that is set)."""
    settings = flatten(config_to_dict(load_config(recipe)))
    keys = [k for k in settings if k.split(".")[-1] in DATASET_KEYS and k.split(".")[0] != "world"]
    return sorted({settings[k] for k in keys if isinstance(settings[k], str) and settings[k] not in ("", "collect")})


def test_the_recipes_folder_holds_the_documented_recipes():
    assert {p.name for p in RECIPES} >= {"demo.yaml", "gpu.yaml", "llama-125m-fineweb.yaml", *CHAT_RECIPES}
    readme = (REPO / "README.md").read_text()
    assert all(f"rlhf run recipes/{name} --dry-run" in readme for name in CHAT_RECIPES), "README gives each command"


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


@pytest.mark.parametrize("name", CHAT_RECIPES)
def test_a_chat_model_recipe_plans_only_what_it_needs_and_fetches_nothing(name, capsys, tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    def no_download(*args, **kwargs):
        raise AssertionError("a dry run must not reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", no_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_download)
    base, sft_data, reward_data, ppo_prompts = CHAT_RECIPES[name]
    main(["run", str(REPO / "recipes" / name), f"run_dir={tmp_path / 'run'}", "--dry-run"])
    rows = {line.split()[0]: line.split(None, 1)[1] for line in capsys.readouterr().out.splitlines()[1:]}
    hub = "(will be fetched from the Hub)"
    assert rows["webtext"].startswith("not needed") and rows["pretrain"].startswith("not needed: no later stage")
    assert f"base={base} {hub}" in rows["sft"] and f"dataset={sft_data} {hub}" in rows["sft"]
    assert f"base={tmp_path / 'run' / 'sft' / 'final' / 'merged'}," in rows["reward"]
    assert f"dataset={reward_data} {hub}" in rows["reward"] and f"prompts={ppo_prompts} {hub}" in rows["ppo"]
    assert not (tmp_path / "run").exists()  # a dry run writes nothing either
