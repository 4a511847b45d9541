"""The default DAG under `dvc repro` on the real-architecture profile
(profiles/realarch.yaml: a Qwen2 teacher and a Llama student with a byte-level BPE
tokenizer, padded logit rows, prompts from a local dataset folder), in a temporary copy
of the repo: every stage runs, its lineage verifies, editing the toy task leaves a real
model's training cached, and editing a model folder in place makes DVC rerun bootstrap.
Its own module (not tests/test_pipeline.py's) so the two xdist workers share the slow tier.
"""

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from . import realarch as builder
from .builders import ALWAYS, DAG, check_verified, ran, restored, sh
from .conftest import copy_repo

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def realarch_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repo copy on profiles/realarch.yaml, its models and prompts built by tests/realarch.py."""
    repo = copy_repo(tmp_path_factory.mktemp("realarch"))
    builder.build(repo / "fixtures" / "realarch")
    shutil.copy(repo / "profiles" / "realarch.yaml", repo / "params.yaml")
    sh(repo, "git", "commit", "-qam", "the real-architecture profile")
    return repo


def test_realarch_profile_runs_the_default_dag_and_its_lineage_verifies(realarch_repo: Path) -> None:
    repo = realarch_repo
    assert ran(sh(repo, "dvc", "repro")) == DAG
    gate = json.loads((repo / "data" / "bootstrap" / "manifest.json").read_text())["models"]
    assert gate["shared_tokenizer"] and gate["chat_templates_equal"]
    vocab = gate["vocab"]
    assert (gate["teacher"]["logit_width"], gate["student"]["logit_width"]) == (vocab + 64, vocab + 16)
    assert gate["teacher"]["architectures"] == ["Qwen2ForCausalLM"]
    assert gate["student"]["architectures"] == ["LlamaForCausalLM"]
    assert len(gate["teacher"]["eos_token_ids"]) == 2
    ident = json.loads((repo / "data" / "identity.json").read_text())
    assert ident["student"]["fingerprint"] == gate["student"]["fingerprint"]
    seed_m = json.loads((repo / "metrics" / "seed.json").read_text())
    assert seed_m["train"] == 96 and seed_m["eval"] == 24
    ev = json.loads((repo / "metrics" / "evaluate.json").read_text())
    for name in ("student_initial", "student_distilled"):  # padded widths 664 vs 616: our own verification
        spec = ev[name]["speculative"]
        assert spec["matches_greedy"] == 1.0 and spec["prompts"] > 0 and spec["draft_tokens"] == 4
    topk = pq.read_table(repo / "data" / "score" / "topk.parquet")
    ids = topk.column("topk_ids").combine_chunks().flatten().to_numpy()
    assert ids.size > 0 and int(ids.max()) < vocab
    for part in ("teacher", "student"):
        # a response cut at max_new_tokens keeps whole characters; a sampled byte sequence
        # that is not UTF-8 before an eos is the model's own output, kept as decoded
        rows = pq.read_table(repo / "data" / part / "generations.parquet").to_pylist()
        assert not any(r["finish_reason"] == "length" and r["response"].endswith("\ufffd") for r in rows)
    check_verified(repo)


def test_editing_the_toy_task_leaves_a_real_model_train_cached(realarch_repo: Path) -> None:
    """The toy task is a plugin a run on real models and a prompt dataset never loads
    (distillflow/tasks): editing it reruns only the stages whose code deps name
    distillflow/tasks (bootstrap, seed, curate, evaluate), each writes the same bytes
    (its manifest records the code it loaded, which leaves the toy task out), and DVC
    keeps teacher, student, pairs, score and train cached."""
    repo = realarch_repo
    assert ran(sh(repo, "dvc", "repro")) == ALWAYS
    toy = repo / "distillflow" / "tasks" / "toy" / "toytask.py"
    before = toy.read_text()
    toy.write_text(before.replace("WALK_STEPS = ((1, 2), (1, 3))", "WALK_STEPS = ((1, 2), (1, 4))"))
    assert toy.read_text() != before
    task_stages = {"bootstrap", "seed", "curate", "evaluate"}
    assert ran(sh(repo, "dvc", "repro")) == ALWAYS | task_stages
    loaded = json.loads((repo / "data" / "curate" / "manifest.json").read_text())["code"]
    assert not any(name.startswith("distillflow/tasks/toy/") for name in loaded), sorted(loaded)
    toy.write_text(before)  # back: DVC's run-cache restores those four stages' first outputs, or they rerun
    out = sh(repo, "dvc", "repro")
    assert ran(out) | restored(out) == ALWAYS | task_stages


def test_editing_a_model_folder_in_place_reruns_bootstrap_and_what_follows(realarch_repo: Path) -> None:
    repo = realarch_repo
    assert ran(sh(repo, "dvc", "repro")) == ALWAYS  # nothing changed: identify alone, same bytes
    f = repo / "fixtures" / "realarch" / "student" / "generation_config.json"
    f.write_text(json.dumps(json.loads(f.read_text()) | {"max_length": 96}))
    sh(repo, "dvc", "repro", "identify")
    status = yaml.safe_load(sh(repo, "dvc", "status", "--json").splitlines()[-1])
    assert "bootstrap" in status and {"changed deps": {"data/identity.json": "modified"}} in status["bootstrap"]
