"""Publishing adapters: the real huggingface_hub upload path against a loopback fake of the Hub API.

`FakeHub` implements what `create_repo`, `repo_info`, `list_repo_refs`, `create_branch`, `get_paths_info` and
`create_commit` (validate-yaml, preupload answering "regular" so file contents come inline, the ndjson commit) need,
keeps every request body, and writes each branch's files to disk so a fresh process can load them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import pytest
import torch
import yaml

from pipeline.checkpoints import finishing, stage_identity, write_stage_json
from pipeline.config import PipelineConfig
from pipeline.errors import UserError

TOKEN = "hf_TestTokenDoNotLeak0123456789abcdef"


# --------------------------------------------------------------------------------------------------------------
# A loopback fake of the Hub API


class FakeHub:
    def __init__(self, token: str = TOKEN):
        self.token = token
        self.repos: dict[str, dict] = {}
        self.bodies: list[bytes] = []  # every request body, for the token check
        self.commits: list[dict] = []  # {"repo_id", "revision", "files": {path: bytes}} per commit received
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                hub.handle(self, "GET")

            def do_POST(self):
                hub.handle(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- state helpers
    def _commit_sha(self, parent: str | None, files: dict[str, bytes]) -> str:
        digest = hashlib.sha1((parent or "").encode())
        for path in sorted(files):
            digest.update(path.encode() + hashlib.sha1(files[path]).digest())
        return digest.hexdigest()

    def tree(self, repo_id: str, revision: str) -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo["trees"][repo["branches"][revision]]

    def export(self, repo_id: str, revision: str, dest: Path) -> Path:
        for path, data in self.tree(repo_id, revision).items():
            (dest / path).parent.mkdir(parents=True, exist_ok=True)
            (dest / path).write_bytes(data)
        return dest

    # -- HTTP
    def reply(self, h, status: int, body=None, headers: dict | None = None) -> None:
        data = json.dumps(body).encode() if body is not None else b""
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)

    def handle(self, h, method: str) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        with self.lock:
            self.bodies.append(body)
            if h.headers.get("Authorization") != f"Bearer {self.token}":
                return self.reply(
                    h, 401, {"error": "bad token"}, {"X-Error-Message": "Invalid credentials in Authorization header"}
                )
            url = urlparse(h.path)
            parts = [unquote(p) for p in url.path.split("/") if p]
            try:
                self.route(h, method, parts, body)
            except KeyError:
                self.reply(h, 404, {"error": "not found"}, {"X-Error-Code": "RepoNotFound"})

    def route(self, h, method: str, parts: list[str], body: bytes) -> None:
        if parts == ["api", "repos", "create"]:
            payload = json.loads(body)
            repo_id = f"{payload['organization']}/{payload['name']}"
            if repo_id in self.repos:
                return self.reply(h, 409, {"error": "exists"})
            files = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}
            sha = self._commit_sha(None, files)
            self.repos[repo_id] = {
                "private": payload.get("visibility") == "private",
                "branches": {"main": sha},
                "tags": {},
                "trees": {sha: files},
            }
            return self.reply(h, 200, {"url": f"{self.url}/{repo_id}", "name": repo_id})
        if parts == ["api", "validate-yaml"]:
            meta = yaml.safe_load(json.loads(body)["content"].split("---")[1])  # a YAML error: a 500, the test fails
            if meta.get("license") not in ("apache-2.0", "mit", "other"):
                error = {"message": '"license" must be a known licence id'}
                return self.reply(h, 400, {"errors": [error], "warnings": []})
            return self.reply(h, 200, {"errors": [], "warnings": []})
        assert parts[:2] == ["api", "models"], parts
        repo_id, rest = f"{parts[2]}/{parts[3]}", parts[4:]
        repo = self.repos[repo_id]  # KeyError -> 404 RepoNotFound
        if method == "GET" and (not rest or rest[0] == "revision"):  # repo_info, with or without a revision
            sha = repo["branches"]["/".join(rest[1:]) or "main"]
            siblings = [{"rfilename": p} for p in repo["trees"][sha]]
            return self.reply(h, 200, {"id": repo_id, "sha": sha, "private": repo["private"], "siblings": siblings})
        if method == "GET" and rest == ["refs"]:

            def refs(kind, items):
                return [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": c} for n, c in items.items()]

            return self.reply(
                h,
                200,
                {"branches": refs("heads", repo["branches"]), "tags": refs("tags", repo["tags"]), "converts": []},
            )
        if rest[0] == "branch":
            branch = "/".join(rest[1:])
            if branch in repo["branches"]:
                return self.reply(h, 409, {"error": "branch exists"})
            repo["branches"][branch] = repo["branches"]["main"]
            return self.reply(h, 200, {})
        revision = "/".join(rest[1:])
        head = repo["branches"].get(revision, revision)
        if head not in repo["trees"]:
            return self.reply(h, 404, {"error": "no revision"}, {"X-Error-Code": "RevisionNotFound"})
        tree = repo["trees"][head]
        if rest[0] == "paths-info":
            paths = parse_qs(body.decode())["paths"]
            infos = [
                {
                    "type": "file",
                    "path": p,
                    "size": len(tree[p]),
                    "oid": hashlib.sha1(f"blob {len(tree[p])}\0".encode() + tree[p]).hexdigest(),
                }
                for p in paths
                if p in tree
            ]
            return self.reply(h, 200, infos)
        if rest[0] == "preupload":
            files = json.loads(body)["files"]
            out = [
                {
                    "path": f["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": hashlib.sha1(f"blob {len(tree[f['path']])}\0".encode() + tree[f["path"]]).hexdigest()
                    if f["path"] in tree
                    else None,
                }
                for f in files
            ]
            return self.reply(h, 200, {"files": out})
        if rest[0] == "commit":
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            header = lines[0]
            assert header["key"] == "header"
            parent = header["value"].get("parentCommit")
            if parent is not None and parent != head:
                return self.reply(h, 412, {"error": "parent commit is not the branch head"})
            new_tree = dict(tree)
            received = {}
            for item in lines[1:]:
                assert item["key"] == "file", item  # regular upload mode: contents inline
                data = base64.b64decode(item["value"]["content"])
                new_tree[item["value"]["path"]] = received[item["value"]["path"]] = data
            sha = self._commit_sha(head, new_tree)
            repo["trees"][sha] = new_tree
            repo["branches"][revision] = sha
            self.commits.append({"repo_id": repo_id, "revision": revision, "files": received})
            return self.reply(h, 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{sha}", "commitOid": sha})
        raise AssertionError(f"unexpected request {method} {parts}")


@pytest.fixture
def hub_env(monkeypatch, tmp_path):
    """Online mode, the token in HF_TOKEN, no cached login; yields a started FakeHub set through HF_ENDPOINT."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-cached-token"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    with FakeHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        yield hub


# --------------------------------------------------------------------------------------------------------------
# A finished run: pretrain (full model) -> sft (LoRA) -> reward -> ppo, written through the real stage helpers


def _finish(cfg: PipelineConfig, stage: str, inputs: dict, metrics: dict, contents: str, save) -> Path:
    identity = stage_identity(cfg, stage, inputs)
    with finishing(cfg, stage) as out:
        save(out)
        write_stage_json(out, identity, metrics, contents=contents)
    return cfg.run_path / stage / "final"


def _lora_model(base, seed: int):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    # init_lora_weights=False: random B, so the adapter changes the logits (a zero B would pass any load test)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    return get_peft_model(base, config).eval()


@pytest.fixture
def run(tmp_path, tiny_model, tiny_tokenizer):
    cfg = PipelineConfig(run_dir=str(tmp_path / "runs" / "demo"))
    cfg.sft.dataset = "demo"
    tiny_model.eval()

    def save_base(out):
        tiny_model.save_pretrained(out)
        tiny_tokenizer.save_pretrained(out)

    pretrain = _finish(cfg, "pretrain", {"corpus": "demo"}, {"perplexity": 41.5}, "model", save_base)
    ids = torch.tensor([tiny_tokenizer.encode("The capital of Veloria is Marnis.")])
    with torch.no_grad():
        base_logits = tiny_model(ids).logits
    model = _lora_model(tiny_model, seed=1)
    with torch.no_grad():
        logits = model(ids).logits

    def save_adapter(out):
        model.save_pretrained(out)
        tiny_tokenizer.save_pretrained(out)

    sft_metrics = {"eval_loss": 2.25, "heldout": {"accuracy": 0.625}, "converged": True}
    sft = _finish(cfg, "sft", {"base": str(pretrain)}, sft_metrics, "adapter", save_adapter)
    cards = tmp_path / "data_cards"
    cards.mkdir()
    (cards / "demo-world.md").write_text("# Demo world\n\nAn invented world and a crawl about it.\n")
    (cards / "demo-instructions.md").write_text("# Demo instructions\n\nChat demonstrations of mixed quality.\n")
    return {
        "cfg": cfg,
        "pretrain": pretrain,
        "sft": sft,
        "ids": ids,
        "logits": logits,
        "base_logits": base_logits,
        "cards": cards,
        "tokenizer": tiny_tokenizer,
    }


def _add_later_stages(run) -> tuple[Path, Path]:
    """Reward and PPO finals whose inputs point at the SFT merged weights and the reward model (adapter files copied)."""
    cfg, sft = run["cfg"], run["sft"]

    def copy_adapter(out):
        for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json"):
            shutil.copy(sft / name, out / name)
        (out / "reward_stats.json").write_text('{"mean": 0.1, "std": 1.3}')

    merged = str(sft / "merged")
    reward = _finish(cfg, "reward", {"base": merged}, {"accuracy": 0.71}, "adapter", copy_adapter)
    inputs = {"policy_base": merged, "reward_model": str(reward)}
    ppo = _finish(cfg, "ppo", inputs, {"reward": 1.5, "kl": 3.2}, "adapter", copy_adapter)
    return reward, ppo


def _split_card(text: str) -> tuple[dict, str]:
    _, meta, body = text.split("---\n", 2)
    return yaml.safe_load(meta), body


def _publish_cli(*argv: str):
    """Parse like `rlhf publish ...` and run the command's main (without re-configuring logging)."""
    from pipeline import publish
    from pipeline.cli import build_parser

    args = build_parser().parse_args(["publish", *argv])
    publish.main(args)
    return args


# --------------------------------------------------------------------------------------------------------------
# Tests


def test_publish_sends_adapter_and_card_and_a_fresh_process_gets_identical_logits(
    run, hub_env, tmp_path, caplog, capsys, monkeypatch
):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_DEBUG", True)  # huggingface_hub then logs every request as a curl command
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")  # restored after the test
    _publish_cli(str(run["sft"].parent), "--repo-id", "demo-org/tiny-sft", "--data-cards", str(run["cards"]))

    (commit,) = hub_env.commits
    assert commit["repo_id"] == "demo-org/tiny-sft" and commit["revision"] == "main"
    sent = commit["files"]
    assert set(sent) == {
        "README.md",
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "data_cards/demo-instructions.md",
        "data_cards/demo-world.md",
    }
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "chat_template.jinja"):
        assert sent[name] == (run["sft"] / name).read_bytes(), name

    meta, body = _split_card(sent["README.md"].decode())
    assert meta["library_name"] == "peft"
    assert meta["license"] == "apache-2.0"
    assert meta["pipeline_tag"] == "text-generation"
    assert {"peft", "lora", "sft"} <= set(meta["tags"])
    assert "base_model" not in meta  # the base is this run's own pretrained model, not a Hub model
    results = meta["model-index"][0]["results"]
    metrics = {m["type"]: m["value"] for r in results for m in r["metrics"]}
    assert metrics == {"eval_loss": 2.25, "heldout.accuracy": 0.625}  # booleans are not metrics
    assert "pretrain → sft" in body
    assert f"`{json.loads((run['pretrain'] / 'stage.json').read_text())['config_hash']}`" in body
    assert "[demo-world](data_cards/demo-world.md)" in body and "## Bias, risks and limitations" in body
    assert "`sft.dataset` | `demo`" in body

    # The token is in no request body (only in the Authorization header), no log record, no output, no saved file.
    assert all(TOKEN.encode() not in b for b in hub_env.bodies)
    assert len(hub_env.bodies) >= 5
    assert all(TOKEN not in r.getMessage() for r in caplog.records)
    assert any("preupload" in r.getMessage() for r in caplog.records)  # the debug request log was on
    out = capsys.readouterr()
    assert TOKEN not in out.out + out.err
    run_dir = run["cfg"].run_path
    assert all(TOKEN.encode() not in p.read_bytes() for p in run_dir.rglob("*") if p.is_file())

    published = json.loads((run_dir / "published.json").read_text())["published"]
    assert [(e["stage"], e["repo_id"], e["revision"]) for e in published] == [("sft", "demo-org/tiny-sft", "main")]
    assert published[0]["commit"] == hub_env.repos["demo-org/tiny-sft"]["branches"]["main"]

    # A fresh process loads the received files onto the base and reproduces the run's logits bit for bit.
    received = hub_env.export("demo-org/tiny-sft", "main", tmp_path / "received")
    torch.save({"ids": run["ids"], "logits": run["logits"]}, tmp_path / "expected.pt")
    assert not torch.equal(run["logits"], run["base_logits"])  # the adapter matters
    script = textwrap.dedent(
        """
        import sys, torch
        from transformers import AutoModelForCausalLM
        from peft import PeftModel
        torch.set_num_threads(int(sys.argv[4]))
        base = AutoModelForCausalLM.from_pretrained(sys.argv[1])
        model = PeftModel.from_pretrained(base, sys.argv[2]).eval()
        expected = torch.load(sys.argv[3])
        with torch.no_grad():
            logits = model(expected["ids"]).logits
        print("EQUAL" if torch.equal(logits, expected["logits"]) else f"DIFFERENT {(logits - expected['logits']).abs().max()}")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            str(run["pretrain"]),
            str(received),
            str(tmp_path / "expected.pt"),
            str(torch.get_num_threads()),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "EQUAL"


def test_publish_later_stage_links_published_earlier_stages(run, hub_env):
    from pipeline.publish import publish

    reward, ppo = _add_later_stages(run)
    sft_result = publish(run["sft"], "demo-org/tiny-sft", data_cards_dir=run["cards"])
    ppo_result = publish(ppo.parent, "demo-org/tiny-ppo", data_cards_dir=run["cards"])

    meta, body = _split_card(hub_env.tree("demo-org/tiny-ppo", "main")["README.md"].decode())
    assert {"ppo", "rlhf"} <= set(meta["tags"])
    assert "pretrain → sft → reward → ppo" in body
    assert (
        f"[demo-org/tiny-sft@{sft_result.commit[:10]}]({hub_env.url}/demo-org/tiny-sft/tree/{sft_result.commit})"
        in body
    )
    lineage = body.split("## Lineage")[1].split("##")[0]
    reward_row = next(line for line in lineage.splitlines() if line.startswith("| 3 |"))
    assert "Reward model" in reward_row and "reward_model of ppo" in reward_row and "not published" in reward_row
    sft_row = next(line for line in lineage.splitlines() if line.startswith("| 2 |"))
    assert "base of reward, policy_base of ppo" in sft_row
    published = json.loads((run["cfg"].run_path / "published.json").read_text())["published"]
    assert [e["stage"] for e in published] == ["sft", "ppo"]
    assert published[1]["commit"] == ppo_result.commit

    # The reward model's card ships its normalisation statistics.
    publish(reward.parent, "demo-org/tiny-rm", data_cards_dir=run["cards"])
    assert "reward_stats.json" in hub_env.tree("demo-org/tiny-rm", "main")


def test_publish_refuses_to_replace_a_different_adapter(run, hub_env, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from pipeline.publish import publish

    first = publish(run["sft"], "demo-org/tiny-sft", data_cards_dir=run["cards"])
    again = publish(run["sft"], "demo-org/tiny-sft", data_cards_dir=run["cards"])  # same adapter: allowed, no-op
    assert again.commit == first.commit and len(hub_env.commits) == 1

    # Another SFT result (other seed, so other weights) in a second run directory.
    cfg2 = PipelineConfig(run_dir=str(Path(run["cfg"].run_dir).parent / "other"), seed=7)
    other = _lora_model(AutoModelForCausalLM.from_pretrained(run["pretrain"]), seed=2)

    def save(out):
        other.save_pretrained(out)
        tiny_tokenizer.save_pretrained(out)

    sft2 = _finish(cfg2, "sft", {"base": str(run["pretrain"])}, {"eval_loss": 2.0}, "adapter", save)
    with pytest.raises(UserError, match=r"already holds a different adapter.*--revision") as err:
        publish(sft2, "demo-org/tiny-sft", data_cards_dir=run["cards"])
    assert "\n" not in str(err.value)
    main_tree = hub_env.tree("demo-org/tiny-sft", "main")
    assert main_tree["adapter_model.safetensors"] == (run["sft"] / "adapter_model.safetensors").read_bytes()

    second = publish(sft2, "demo-org/tiny-sft", revision="seed-7", data_cards_dir=run["cards"])
    assert (
        hub_env.tree("demo-org/tiny-sft", "seed-7")["adapter_model.safetensors"]
        == (sft2 / "adapter_model.safetensors").read_bytes()
    )
    assert hub_env.tree("demo-org/tiny-sft", "main") == main_tree  # main untouched
    assert second.commit != first.commit

    hub_env.repos["demo-org/tiny-sft"]["tags"]["v1"] = first.commit
    with pytest.raises(UserError, match="is a tag"):
        publish(sft2, "demo-org/tiny-sft", revision="v1", data_cards_dir=run["cards"])
    with pytest.raises(UserError, match="exists and is public"):
        publish(run["sft"], "demo-org/tiny-sft", private=True, data_cards_dir=run["cards"])


def test_publish_hub_refusals_are_one_line_errors(run, hub_env, monkeypatch):
    from pipeline.publish import publish

    with pytest.raises(
        UserError, match=r"rejected the model card's metadata \(\"license\" must be .*--license"
    ) as err:
        publish(run["sft"], "demo-org/tiny-sft", license="not-a-licence")
    assert "\n" not in str(err.value)
    assert hub_env.commits == []

    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(UserError, match="token was rejected") as err:
        publish(run["sft"], "demo-org/tiny-sft")
    assert "\n" not in str(err.value) and "hf_wrong" not in str(err.value)


def test_publish_bad_inputs_are_one_line_errors(run, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from pipeline.publish import publish

    cases = []
    unfinished = run["cfg"].run_path / "reward"
    (unfinished / "checkpoint-4").mkdir(parents=True)
    cases.append(((unfinished, "o/n"), {}, r"not a finished stage \(no final/stage.json\).*rlhf reward RECIPE"))
    cases.append(((run["pretrain"].parent, "o/n"), {}, r"has no adapter.*finetune=lora"))
    cases.append(((tmp_path / "nowhere", "o/n"), {}, "does not exist"))
    for bad in ("no-namespace", "a/b/c", "org/bad--name", "org/na me"):
        cases.append(((run["sft"], bad), {}, r"not a valid Hub repo id.*--repo-id my-org/demo-sft"))
    cases.append(((run["sft"], "o/n"), {"revision": "a..b"}, "not a branch name"))
    cases.append(((run["sft"], "o/n"), {"revision": "0" * 40}, "not a branch name"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    cases.append(((run["sft"], "o/n"), {}, r"no Hugging Face token: set HF_TOKEN.*hf auth login"))
    for args, kwargs, pattern in cases:
        with pytest.raises(UserError, match=pattern) as err:
            publish(*args, **kwargs)
        assert "\n" not in str(err.value), str(err.value)

    # An adapter with only empty tensors (an un-gathered ZeRO-3 save) is refused too.
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(0)}, str(run["sft"] / "adapter_model.safetensors"))
    with pytest.raises(UserError, match="holds no weights"):
        publish(run["sft"], "o/n", dry_run=True)


def test_publish_dry_run_writes_card_and_lists_files_without_network(run, tmp_path, monkeypatch, caplog):
    """A Hub base model and a Hub dataset: base_model and datasets metadata, adapter_config pointed at the base."""
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there; a dry run never calls it
    monkeypatch.delenv("HF_TOKEN", raising=False)
    cfg = PipelineConfig(run_dir=str(tmp_path / "hubrun"))
    cfg.sft.dataset = "HuggingFaceH4/ultrachat_200k"
    sft_files = run["sft"]

    def copy(out):
        for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json"):
            shutil.copy(sft_files / name, out / name)

    final = _finish(cfg, "sft", {"base": "HuggingFaceTB/SmolLM2-135M"}, {"eval_loss": 1.5}, "adapter", copy)
    (run["cards"] / "HuggingFaceH4--ultrachat_200k.md").write_text("# UltraChat 200k\n")
    caplog.set_level(logging.INFO)
    args = _publish_cli(str(final.parent), "--repo-id", "me/smol-sft", "--dry-run", "--data-cards", str(run["cards"]))
    assert args.dry_run

    card = final.parent / "publish" / "README.md"
    meta, body = _split_card(card.read_text())
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M"
    assert meta["datasets"] == ["HuggingFaceH4/ultrachat_200k"]
    assert "hub → sft" not in body and "base: HuggingFaceTB/SmolLM2-135M → sft" in body
    assert "[HuggingFaceH4--ultrachat_200k](data_cards/HuggingFaceH4--ultrachat_200k.md)" in body
    listing = "\n".join(r.getMessage() for r in caplog.records)
    assert "would upload 6 files to me/smol-sft@main" in listing
    for name in (
        "README.md",
        "adapter_model.safetensors",
        "adapter_config.json",
        "data_cards/HuggingFaceH4--ultrachat_200k.md",
    ):
        assert name in listing
    assert not (cfg.run_path / "published.json").exists()

    from pipeline.publish import prepare_upload

    files, _ = prepare_upload(final, "me/smol-sft", "main", "apache-2.0", run["cards"])
    config = json.loads(next(f for f in files if f.path_in_repo == "adapter_config.json").data)
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M"
