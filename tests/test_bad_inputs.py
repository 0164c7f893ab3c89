"""Bad input, table-driven: every mistake ends with exit code 2 and exactly one line on stderr (log records at INFO
aside), no traceback, and nothing finished changed (the finished stage's files and run_dir/config.yaml hash the same
before and after; a stage that failed leaves no identity behind).

The run directory holds a finished tiny reward stage (made once per module), so the cases that touch a finished run
(changed settings, another recipe, a damaged stage.json, read-only, disk full) meet a real one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_base, tiny_rankings_jsonl

from pipeline.cli import main

LOG_INFO = re.compile(r"^\d\d:\d\d:\d\d INFO ")  # progress records; warnings and errors count as lines
# tqdm's progress bars (the Trainer's, datasets'): redrawn in place with \r, not lines a user reads
PROGRESS = re.compile(r"[^\r\n]*?\d+%\|[^|\r\n]*\| *\d+/\d+ \[[^\]\r\n]*\]|[^\r\n]*?: \d+ examples \[[^\]\r\n]*\]")


@dataclass
class Ctx:
    root: Path  # shared fixture files (base model, datasets)
    run: Path  # this case's copy of the finished run directory
    recipe: Path  # the recipe that made it
    monkeypatch: pytest.MonkeyPatch

    def reward(self, *extra: str) -> list[str]:
        return ["reward", str(self.recipe), *extra]

    def sft(self, dataset: str, *extra: str) -> list[str]:
        return ["sft", str(self.recipe), f"sft.base={self.root / 'base'}", f"sft.dataset={dataset}", *extra]

    def pretrain(self, dataset: str) -> list[str]:
        return ["pretrain", str(self.recipe), f"pretrain.dataset={dataset}", "pretrain.model.hidden_size=32"]

    def file(self, name: str, data: str | bytes) -> str:
        path = self.root / "cases" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return str(path)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_tokenizer):
    """A run directory whose reward stage finished (tiny model, 2 steps), made through the CLI."""
    root = tmp_path_factory.mktemp("bad-inputs")
    save_tiny_base(tiny_tokenizer, root / "base")
    (root / "rankings.jsonl").write_text(tiny_rankings_jsonl(12, responses=3, max_words=6))
    chats = [
        {"messages": [{"role": "user", "content": f"Hello {i}"}, {"role": "assistant", "content": "Hi there."}]}
        for i in range(12)
    ]
    (root / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    recipe = root / "recipe.yaml"
    recipe.write_text(
        f"run_dir: {root / 'run'}\nseed: 1234\nreward:\n  base: {root / 'base'}\n  dataset: {root / 'rankings.jsonl'}\n"
        "  report_to: none\n  per_device_train_batch_size: 4\n  max_steps: 2\n  save_steps: 1\n  lora:\n    r: 4\n"
        "  stats_prompts: 2\n  max_seq_len: 128\n  collect:\n    max_new_tokens: 4\nsft:\n  max_seq_len: 128\n"
    )  # 128: the tiny base's context
    code, err = cli("reward", str(recipe))
    assert code == 0, err
    assert (root / "run" / "reward" / "final" / "stage.json").is_file()
    return root, recipe


def cli(*argv: str) -> tuple[int, str]:
    """The CLI in this process: (exit code, stderr)."""
    err, out = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            main(list(argv))
        except SystemExit as exc:
            code = exc.code
    return code, err.getvalue()


def finished_files(run: Path) -> dict[str, str]:
    """sha256 of run_dir/config.yaml and of every file of every finished stage."""
    files = [run / "config.yaml", *(p for p in run.glob("*/final/**/*") if p.is_file())]
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.is_file()}


def identities(run: Path) -> set[str]:
    return {str(p.relative_to(run)) for p in run.glob("*/identity.json")}


# --------------------------------------------------------------------------------------------------------------
# The cases: id -> (what the case does, a fragment of the one line)


def _disk_full_on_save(ctx: Ctx) -> list[str]:
    """torch's zip writer on a full disk: a RuntimeError (no OSError) from torch.save (the optimizer state)."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if str(f).endswith("optimizer.pt"):
            raise RuntimeError(
                "[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0\n"
                "PytorchStreamWriter failed writing file data/0: file write failed"
            )
        return real_save(obj, f, *args, **kwargs)

    ctx.monkeypatch.setattr(torch, "save", save)
    return ctx.reward("reward.learning_rate=0.002", "--rerun", f"run_dir={ctx.run.parent / 'other-run'}")


def _enospc(ctx: Ctx) -> list[str]:
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if str(dst).endswith("identity.json"):
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real_replace(src, dst, *args, **kwargs)

    ctx.monkeypatch.setattr(os, "replace", replace)
    return ctx.sft(str(ctx.root / "chats.jsonl"))


def _read_only(ctx: Ctx) -> list[str]:
    """A read-only file system (root ignores chmod, so EROFS is raised where the stage makes its folder)."""
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self.is_relative_to(ctx.run):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    ctx.monkeypatch.setattr(Path, "mkdir", mkdir)
    return ctx.sft(str(ctx.root / "chats.jsonl"))


def _truncate_stage_json(ctx: Ctx) -> None:
    path = ctx.run / "reward" / "final" / "stage.json"
    path.write_bytes(path.read_bytes()[:100])


def _status_of_truncated(ctx: Ctx) -> list[str]:
    _truncate_stage_json(ctx)
    return ["status", str(ctx.run)]


def _reward_on_truncated(ctx: Ctx) -> list[str]:
    _truncate_stage_json(ctx)
    return ctx.reward()


def _ppo_on_truncated(ctx: Ctx) -> list[str]:
    _truncate_stage_json(ctx)
    return [
        "ppo",
        str(ctx.recipe),
        f"ppo.policy_base={ctx.root / 'base'}",
        "ppo.dataset=demo",
        "ppo.max_prompt_len=64",
    ]


def _another_recipe(ctx: Ctx) -> list[str]:
    other = ctx.root / "cases" / "other.yaml"
    other.parent.mkdir(exist_ok=True)
    other.write_text(ctx.recipe.read_text().replace("seed: 1234", "seed: 99"))
    return ["reward", str(other)]


def _bad_yaml(ctx: Ctx) -> list[str]:
    return ["sft", ctx.file("bad.yaml", "seed: 1\nsft: [unclosed\n")]


def _list_recipe(ctx: Ctx) -> list[str]:
    return ["sft", ctx.file("list.yaml", "- seed\n- 1\n")]


def _typo_in_file(ctx: Ctx) -> list[str]:
    return ["sft", ctx.file("typo.yaml", "seed: 1\nsft:\n  learnig_rate: 0.1\n")]


def _latin1(ctx: Ctx) -> str:
    record = '{"messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "oui"}]}\n'
    return ctx.file("latin1.jsonl", record.encode("latin-1"))


def _bad_question(ctx: Ctx) -> str:
    question = {"messages": [{"role": "user", "content": None}], "answer": "Marnis"}
    return ctx.file("qa.jsonl", json.dumps(question) + "\n")


def _cut_in_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _report_of_truncated(ctx: Ctx) -> list[str]:
    _truncate_stage_json(ctx)
    return ["report", str(ctx.run)]


def _chat_truncated_adapter(ctx: Ctx) -> list[str]:
    _cut_in_half(ctx.run / "reward" / "final" / "adapter_model.safetensors")
    return ["chat", str(ctx.run / "reward"), "--prompt", "Hi", "--max-new-tokens", "2"]


def _chat_adapter_weights_missing(ctx: Ctx) -> list[str]:
    (ctx.run / "reward" / "final" / "adapter_model.safetensors").unlink()
    return ["chat", str(ctx.run / "reward"), "--prompt", "Hi", "--max-new-tokens", "2"]


def _publish_truncated_adapter(ctx: Ctx) -> list[str]:
    _cut_in_half(ctx.run / "reward" / "final" / "adapter_model.safetensors")
    return ["publish", str(ctx.run / "reward"), "--repo-id", "o/n", "--dry-run"]


def _publish_damaged_published_json(ctx: Ctx) -> list[str]:
    (ctx.run / "published.json").write_text('{"published": [{"stage": "reward", ')
    return ["publish", str(ctx.run / "reward"), "--repo-id", "o/n", "--dry-run"]


def _run_dir_in_use(ctx: Ctx) -> list[str]:
    """Another command holds the run directory's lock (a second `rlhf run` on the same run_dir at once)."""
    import fcntl

    handle = open(ctx.run / ".lock", "a+")  # held open on ctx while the command runs
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    ctx.monkeypatch.setattr(ctx, "lock_holder", handle, raising=False)
    return ctx.reward("reward.learning_rate=0.5", "--rerun")


JSON_ARRAY = '[{"prompt": "a", "chosen": 1},\n {"prompt": "d"}]\n'  # a JSON array in a .jsonl file, no usable record

CASES: dict[str, tuple[Callable[[Ctx], list[str]], str]] = {
    # recipes and the command line
    "recipe-missing": (lambda c: ["sft", str(c.root / "nope.yaml")], "recipe not found"),
    "recipe-not-yaml": (_bad_yaml, "is not valid YAML"),
    "recipe-a-list": (_list_recipe, "must be a YAML mapping"),
    "recipe-key-typo": (_typo_in_file, "did you mean 'sft.learning_rate'"),
    "override-key-typo": (lambda c: c.reward("reward.learnign_rate=1"), "did you mean 'reward.learning_rate'"),
    "unknown-section": (lambda c: c.reward("rewrd.max_steps=1"), "unknown recipe key 'rewrd'"),
    "wrong-type-number": (lambda c: c.reward("reward.learning_rate=fast"), "expected a number"),
    "wrong-type-int": (lambda c: c.reward("reward.max_steps=2.5"), "reward.max_steps"),
    "wrong-choice": (lambda c: c.reward("reward.dataset_format=xml"), "reward.dataset_format"),
    "out-of-range": (lambda c: c.reward("reward.test_share=0.7"), "reward.test_share"),
    "override-not-key-value": (lambda c: c.reward("max_steps"), "is not key=value"),
    "override-into-a-value": (lambda c: c.reward("seed.x=1"), "is a value, not a section"),
    "round-past-rounds": (lambda c: [*c.reward(), "--round", "3"], "round"),
    "from-after-until": (lambda c: ["run", str(c.recipe), "--from", "ppo", "--until", "sft"], "comes after"),
    "only-with-from": (lambda c: ["run", str(c.recipe), "--only", "sft", "--from", "sft"], "cannot be combined"),
    "status-not-a-run": (lambda c: ["status", str(c.root)], "is not a run directory"),
    "status-given-a-stage-folder": (lambda c: ["status", str(c.run / "reward" / "final")], "lies in one: give"),
    "report-given-a-stage-folder": (lambda c: ["report", str(c.run / "reward")], "lies in one: give"),
    "accelerate-config-missing": (
        lambda c: ["run", str(c.recipe), "--only", "ppo", "--accelerate-config", "nope.yaml", "ppo.dataset=demo"],
        "accelerate config not found",
    ),
    # datasets
    "sft-non-utf8": (lambda c: c.sft(_latin1(c)), "not UTF-8"),
    "reward-non-utf8": (lambda c: c.reward(f"reward.dataset={_latin1(c)}", f"run_dir={c.run}-2"), "not UTF-8"),
    "reward-json-array-as-jsonl": (
        lambda c: c.reward("reward.dataset=" + c.file("array.jsonl", JSON_ARRAY), f"run_dir={c.run}-2"),
        "array.jsonl",
    ),
    "sft-empty-jsonl": (lambda c: c.sft(c.file("empty.jsonl", "")), "empty"),
    "sft-garbage-jsonl": (lambda c: c.sft(c.file("garbage.jsonl", "not json\n{{{\n")), "garbage.jsonl"),
    "sft-dataset-missing": (lambda c: c.sft(str(c.root / "nope.jsonl")), "file not found"),
    "sft-base-missing": (
        lambda c: ["sft", str(c.recipe), f"sft.base={c.root / 'nobase'}", f"sft.dataset={c.root / 'chats.jsonl'}"],
        "sft.base not found",
    ),
    "reward-empty-dataset": (
        lambda c: c.reward(f"reward.dataset={c.file('empty-r.jsonl', '')}", f"run_dir={c.run}-2"),
        "empty-r.jsonl",
    ),
    "pretrain-empty-corpus": (lambda c: c.pretrain(c.file("empty.txt", "")), "is empty"),
    "pretrain-garbage-jsonl": (lambda c: c.pretrain(c.file("corpus.jsonl", "}{ not json\n")), "cannot be read"),
    "pretrain-unknown-format": (lambda c: c.pretrain(c.file("corpus.bin", os.urandom(64))), "not a parquet"),
    "pretrain-corpus-missing": (lambda c: c.pretrain(str(c.root / "none" / "corpus.jsonl")), "does not exist"),
    "sft-dataset-empty-string": (lambda c: c.sft(""), "sft.dataset is empty"),
    "sft-eval-split-name-on-a-local-file": (
        lambda c: c.sft(str(c.root / "chats.jsonl"), "sft.eval_split=test"),
        "sft.eval_split: 'test' is not an existing file or directory",
    ),
    "sft-qa-eval-question-not-text": (
        lambda c: c.sft(str(c.root / "chats.jsonl"), f"sft.qa_eval={_bad_question(c)}"),
        "sft.qa_eval: ",
    ),
    # values the trainer would refuse with a traceback, or take silently
    "seed-out-of-range": (lambda c: c.reward("seed=-1", f"run_dir={c.run}-2"), "seed: must be in [0, 2**32)"),
    "eval-batch-size-zero": (
        lambda c: c.reward("reward.per_device_eval_batch_size=0", f"run_dir={c.run}-2"),
        "reward.per_device_eval_batch_size",
    ),
    "logging-steps-zero": (lambda c: c.sft(str(c.root / "chats.jsonl"), "sft.logging_steps=0"), "sft.logging_steps"),
    "negative-max-grad-norm": (
        lambda c: c.sft(str(c.root / "chats.jsonl"), "sft.max_grad_norm=-1"),
        "sft.max_grad_norm",
    ),
    "lora-alpha-zero": (lambda c: c.sft(str(c.root / "chats.jsonl"), "sft.lora.alpha=0"), "sft.lora.alpha"),
    "lora-target-module-unknown": (
        lambda c: c.sft(str(c.root / "chats.jsonl"), "sft.lora.target_modules=[nope]"),
        "sft.lora.target_modules: 'nope' matches no module of the model (it has embed_tokens",
    ),
    "reward-lora-target-module-unknown": (
        lambda c: c.reward("reward.lora.target_modules=[q_proj,nope]", f"run_dir={c.run}-2"),
        "reward.lora.target_modules: 'nope' matches no module of the model",
    ),
    "ppo-lora-target-module-unknown": (
        lambda c: [
            "ppo",
            str(c.recipe),
            f"ppo.policy_base={c.root / 'base'}",
            f"ppo.dataset={c.root / 'chats.jsonl'}",
            "ppo.max_prompt_len=64",
            "ppo.lora.target_modules=[nope]",
        ],
        "ppo.lora.target_modules: 'nope' matches no module of the model",
    ),
    "lora-module-to-save-unknown": (
        lambda c: c.sft(str(c.root / "chats.jsonl"), "sft.lora.modules_to_save=[nope]"),
        "sft.lora.modules_to_save: 'nope' matches no module of the model (it has embed_tokens",
    ),
    "sft-dry-run-max-seq-len-past-context": (
        lambda c: c.sft(str(c.root / "chats.jsonl"), "sft.max_seq_len=4096", "--dry-run"),
        "sft.max_seq_len = 4096 exceeds the context of",
    ),
    # the run directory
    "changed-settings": (lambda c: c.reward("reward.learning_rate=0.5"), "already finished"),
    "another-recipe-same-run-dir": (_another_recipe, "already finished"),
    "status-truncated-stage-json": (_status_of_truncated, "stage.json is damaged"),
    "rerun-on-truncated-stage-json": (_reward_on_truncated, "stage.json is damaged"),
    "downstream-of-truncated-stage-json": (_ppo_on_truncated, "stage.json is damaged"),
    "ppo-dry-run-no-reward-model": (
        lambda c: [
            "ppo",
            str(c.recipe),
            "ppo.dataset=demo",
            f"ppo.policy_base={c.root / 'base'}",
            f"ppo.reward_model={c.root / 'no-rm'}",
            "--dry-run",
        ],
        "input 'reward' not found",
    ),
    "ppo-dry-run-upstream-missing": (
        lambda c: ["ppo", str(c.recipe), "ppo.dataset=demo", "--dry-run"],
        "run stage 'sft' first",
    ),
    "report-truncated-stage-json": (_report_of_truncated, "stage.json is damaged"),
    "chat-truncated-adapter": (_chat_truncated_adapter, "is damaged (adapter_model.safetensors is"),
    "chat-adapter-weights-missing": (_chat_adapter_weights_missing, "no adapter_model.safetensors"),
    "publish-dry-run-truncated-adapter": (_publish_truncated_adapter, "is damaged (adapter_model.safetensors is"),
    "publish-damaged-published-json": (_publish_damaged_published_json, "published.json is damaged"),
    "run-dir-in-use": (_run_dir_in_use, "another rlhf command"),
    "read-only-run-dir": (_read_only, "read-only file system"),
    "disk-full-enospc": (_enospc, "disk full while writing"),
    "disk-full-torch-save": (_disk_full_on_save, "disk full while writing into"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, finished, tmp_path, monkeypatch):
    root, recipe = finished
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    text = recipe.read_text().replace(str(root / "run"), str(run))
    (tmp_path / "recipe.yaml").write_text(text)
    ctx = Ctx(root, run, tmp_path / "recipe.yaml", monkeypatch)
    make_argv, fragment = CASES[case]
    argv = make_argv(ctx)
    before, ids_before = finished_files(run), identities(run)
    code, err = cli(*argv)
    lines = [line for line in PROGRESS.sub("", err).splitlines() if line.strip() and not LOG_INFO.match(line)]
    assert "Traceback" not in err
    assert (code, len(lines)) == (2, 1), err
    assert lines[0].startswith("error: ") and fragment in lines[0], lines[0]
    assert finished_files(run) == before
    assert identities(run) == ids_before  # a stage that failed leaves no identity to refuse the corrected command
    if os.environ.get("BAD_INPUT_TABLE"):
        with open(os.environ["BAD_INPUT_TABLE"], "a") as table:
            table.write(f"| {case} | {lines[0]} |\n")


def test_at_least_thirty_cases():
    assert len(CASES) >= 30


def test_chat_a_template_that_refuses_the_system_message_is_one_line():
    """Gemma 2's template raises on a system turn: `rlhf chat --system` ended in a jinja traceback."""
    from families import FAMILIES, build_tokenizer

    from pipeline.chat import render
    from pipeline.errors import UserError

    tokenizer = build_tokenizer(FAMILIES["gemma2"])
    with pytest.raises(UserError) as info:
        render(tokenizer, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    message = str(info.value)
    assert "\n" not in message and "System role not supported" in message and "--system" in message


def test_chat_history_is_cut_to_the_context(tiny_tokenizer):
    """transformers 5's apply_chat_template(tokenize=True) returns a BatchEncoding, whose len() is 2: the history
    was never cut, and a long chat ran past the model's context."""
    from pipeline.chat import fit_history

    turns = [
        {"role": "user", "content": "Tell me of the river Tol. " * 4},
        {"role": "assistant", "content": "Marnis. " * 8},
    ]
    messages = [{"role": "system", "content": "Be brief."}, *turns * 6, {"role": "user", "content": "Last?"}]
    kept = fit_history(tiny_tokenizer, messages, budget=64)
    assert kept[0]["role"] == "system" and kept[-1] == messages[-1] and len(kept) < len(messages)
    assert (
        len(tiny_tokenizer.apply_chat_template(kept, add_generation_prompt=True)["input_ids"]) <= 64 or len(kept) == 2
    )


def test_rerun_replaces_a_stage_whose_stage_json_is_damaged(finished, tmp_path):
    """The damaged-stage.json error advises --rerun; --rerun itself used to stop on the same error (a dead end)."""
    root, recipe = finished
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    (tmp_path / "recipe.yaml").write_text(recipe.read_text().replace(str(root / "run"), str(run)))
    stage_json = run / "reward" / "final" / "stage.json"
    stage_json.write_bytes(stage_json.read_bytes()[:100])
    damaged = stage_json.read_bytes()
    code, err = cli("run", str(tmp_path / "recipe.yaml"), "--only", "reward", "--rerun", "--no-report")
    assert code == 0, err
    assert json.loads(stage_json.read_text())["stage"] == "reward"
    (aside,) = run.glob("reward.replaced-*")
    assert (aside / "final" / "stage.json").read_bytes() == damaged  # moved aside, not deleted


def test_only_stops_at_an_override():
    """`--only ppo ppo.kl_target=3`: nargs='+' took the override for a stage name ('unknown stage')."""
    from pipeline.cli import parse_args

    args = parse_args(["run", "r.yaml", "--only", "sft", "ppo", "ppo.kl_target=3", "--rerun", "seed=2"])
    assert args.only == ["sft", "ppo"] and args.overrides == ["ppo.kl_target=3", "seed=2"] and args.rerun
