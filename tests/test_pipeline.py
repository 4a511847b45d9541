"""The whole DAG under `dvc repro` on the smoke profile, in a temporary copy of the repo.

Slow tier (a few minutes on 2 cores), run in CI. It checks what a new user meets:
every stage runs, outputs and metrics exist and agree, a second repro reruns only
`identify` (always changed; same bytes), and `dvc exp run -S` reruns exactly the stages
downstream of the param. The same DAG then runs on the real-architecture profile
(profiles/realarch.yaml: a Qwen2 teacher and a Llama student with a byte-level BPE
tokenizer, padded logit rows, prompts from a local dataset folder), its lineage
verifies, and editing a model folder in place makes DVC rerun bootstrap
(tests/test_pipeline_realarch.py).
"""

import csv
import json
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from .builders import ALWAYS, COMPARISON, DAG, check_verified, ran, restored, sh
from .conftest import copy_repo

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_repo(tmp_path_factory.mktemp("repo"))


def test_repro_runs_every_stage_and_writes_consistent_outputs(repo: Path) -> None:
    out = sh(repo, "dvc", "repro")
    assert ran(out) == DAG  # the comparison is its own pipeline: not run by a plain repro
    assert not (repo / "metrics" / "compare").exists()  # no cell ran
    check_verified(repo)
    out = sh(repo, "dvc", "repro", "comparison/dvc.yaml")
    assert ran(out) == COMPARISON | ALWAYS  # it reads only the default pipeline's prompts, up to date
    ev = json.loads((repo / "metrics" / "evaluate.json").read_text())
    for name in ("teacher", "student_initial", "student_distilled"):
        assert 0.0 <= ev[name]["accuracy"]["exact_match"] <= 1.0
    assert ev["student_distilled"]["kl_teacher_student"] > 0
    seed_m = json.loads((repo / "metrics" / "seed.json").read_text())
    assert pq.read_table(repo / "data" / "seed" / "train.parquet").num_rows == seed_m["train"] == 96
    assert ev["eval_prompts"] == seed_m["eval"] == 32
    cur = json.loads((repo / "metrics" / "curate.json").read_text())
    assert cur["pairs_in"] == cur["kept"] + cur["quarantined"]
    assert pq.read_table(repo / "data" / "curate" / "curated.parquet").num_rows == cur["kept"]
    assert pq.read_table(repo / "data" / "curate" / "quarantine.parquet").num_rows == cur["quarantined"]
    assert (repo / "data" / "train" / "model" / "model.safetensors").is_file()
    live = repo / "plots" / "train" / "plots" / "metrics"  # DVCLive: one <name>.tsv per logged value
    assert {
        "loss",
        "chosen_term",
        "rejected_term",
        "beta",
        "alpha_t_mean",
        "alpha_t_min",
        "alpha_t_max",
        "alpha_s_mean",
    } <= {f.stem for f in live.glob("*.tsv")}
    lines = (live / "loss.tsv").read_text().splitlines()
    assert (
        lines[0] == "step\tloss"
        and len(lines) == json.loads((repo / "metrics" / "train.json").read_text())["steps"] + 1
    )
    manifest = json.loads((repo / "data" / "train" / "manifest.json").read_text())
    assert (
        manifest["inputs"]["pairs"]["sha256"]
        == json.loads((repo / "data" / "curate" / "manifest.json").read_text())["outputs"]["curated.parquet"]["sha256"]
    )
    shown = json.loads(sh(repo, "dvc", "metrics", "show", "--json").strip().splitlines()[-1])
    summary = shown[""]["data"]["metrics/summary.json"]["data"]["r1"]  # the one DVC metric: the headline
    assert summary["exact_match"]["distilled"] == ev["student_distilled"]["accuracy"]["exact_match"]
    assert summary["kl"]["distilled"] == ev["student_distilled"]["kl_teacher_student"]
    assert set(summary["distilled_per_skill"]) == {"add", "reverse", "sort", "upper"}
    assert list(shown[""]["data"]) == ["metrics/summary.json"]
    table = list(csv.DictReader((repo / "reports" / "comparison" / "table.csv").open()))
    assert {r["run"] for r in table} == {"kd", "distillm2"}
    assert all((r["bootstraps"], r["seeds"]) == ("2", "1") for r in table)
    # the report reads only the cells' committed metrics: kd's mean is its cells' mean, in points
    cells = [json.loads((repo / "metrics" / "compare" / f"kd-b{b}-s1.json").read_text()) for b in (1, 2)]
    scores = [pq.read_table(repo / "metrics" / "compare" / f"kd-b{b}-s1.prompts.parquet") for b in (1, 2)]
    right = [sum(t.column("correct").to_pylist()) / t.num_rows for t in scores]
    assert [c["student"]["accuracy"]["exact_match"] for c in cells] == [round(x, 4) for x in right]
    kd = table[[r["run"] for r in table].index("kd")]
    assert float(kd["exact_match_mean"]) == pytest.approx(100 * sum(right) / 2, abs=1e-5)
    assert float(kd["optimizer_steps"]) == sum(c["cost"]["optimizer_steps"] for c in cells) / 2 > 0
    readme = (repo / "reports" / "comparison" / "README.md").read_text()
    assert (repo / "reports" / "comparison" / "exact_match.png").is_file()
    assert "## Primary result" in readme and "distillm2 - kd" in readme and "## Cost" in readme


def test_second_repro_is_a_no_op(repo: Path) -> None:
    before = (repo / "data" / "identity.json").read_bytes()
    out = sh(repo, "dvc", "repro")
    assert ran(out) == ALWAYS and (repo / "data" / "identity.json").read_bytes() == before
    assert sh(repo, "dvc", "status").split() == ["identify:", "always", "changed"]


def test_training_param_reruns_only_train_and_evaluate(repo: Path) -> None:
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "first run")
    out = sh(repo, "dvc", "exp", "run", "-S", "train.lr=0.005")
    assert ran(out) == {"train", "evaluate"} | ALWAYS  # not the comparison cells: their own pipeline


def test_teacher_sampling_param_reruns_teacher_and_downstream_only(repo: Path) -> None:
    out = sh(repo, "dvc", "exp", "run", "-S", "teacher.temperature=0.8")
    assert ran(out) == {"teacher", "pairs", "curate", "score", "train", "evaluate"} | ALWAYS


@pytest.mark.parametrize(
    "overrides",
    [
        # kd and distillm2 also run end to end in the comparison's smoke cells above, and
        # every method through the trainer in tests/test_methods.py: here the ones with a
        # distinct path through train (no teacher, sequence log-probs, stored top-k, full logits)
        ["train.method=sft"],
        ["train.method=dpkd"],
        ["train.method=distillm2", "train.teacher_signal=topk"],
        [
            "train.method=distillm2",
            "train.distillm2.contrastive=false",
            "train.distillm2.beta_ramp=false",
            "train.distillm2.adaptive_alpha=false",
            "train.logits=full",
        ],
        # on-policy distillation from the stored scores (the teacher's log-prob of each sampled
        # token, what a served teacher gives), and MiniLLM sampling during training
        ["train.method=opd", "train.teacher_signal=topk"],
        ["train.method=minillm", "train.teacher_signal=online", "train.online.every=2"],
    ],
    ids=lambda o: ",".join(o),
)
def test_methods_and_ablation_switches_run_end_to_end(repo: Path, overrides: list[str]) -> None:
    out = sh(repo, "dvc", "exp", "run", *[a for o in overrides for a in ("-S", o)])
    assert ran(out) == {"train", "evaluate"} | ALWAYS  # `dvc exp run` runs dvc.yaml, not the comparison
    metrics = json.loads((repo / "metrics" / "train.json").read_text())
    # `dvc exp run -S` leaves its change in the workspace, so each case names its method.
    method = next(o.split("=")[1] for o in overrides if o.startswith("train.method="))
    assert metrics["method"] == method and metrics["steps"] > 0
    assert ("sampled_tokens" in metrics) == ("train.online.every=2" in overrides)
    assert metrics.get("sampled_tokens", 1) > 0


def test_an_on_policy_round_samples_the_latest_student_and_trains_on(repo: Path) -> None:
    """train.rounds adds Algorithm 1's rounds: round 2 (one stage, stages/round.py)
    samples round 1's student again, rebuilds pairs, curates, scores and trains from that
    student, then round_evaluate evaluates it, all under data/rounds/r2/. The last of the
    smoke repo's runs: it leaves E = 2 in the workspace."""
    # the method cases above leave their switches in the workspace: set them back
    defaults = [
        "train.method=distillm2",
        "train.teacher_signal=online",
        "train.logits=chunked",
        "train.online.every=0",
        *(f"train.distillm2.{k}=true" for k in ("contrastive", "beta_ramp", "adaptive_alpha")),
    ]
    out = sh(
        repo,
        "dvc",
        "exp",
        "run",
        *(a for o in defaults for a in ("-S", o)),
        "-S",
        "++train.rounds.r2={previous: data/train}",
    )
    # round 1's train reruns too: with E = 2 its beta ramp covers the first half only
    assert ran(out) == {"train", "evaluate", "round@r2", "round_evaluate@r2"} | ALWAYS
    assert not restored(out) & COMPARISON  # the comparison is not part of an experiment run
    r2 = repo / "data" / "rounds" / "r2"
    gens = pq.read_table(r2 / "student" / "generations.parquet").to_pylist()
    round1_student = json.loads((repo / "data" / "train" / "manifest.json").read_text())
    sampled = json.loads((r2 / "student" / "manifest.json").read_text())
    assert sampled["inputs"]["model"]["path"] == "data/train/model"
    assert (
        {g["model"] for g in gens}
        == {sampled["model"]["fingerprint"]}
        != {round1_student["initial_student"]["fingerprint"]}
    )
    pairs = pq.read_table(r2 / "pairs" / "pairs.parquet").to_pylist()
    assert {p["rejected_id"] for p in pairs} <= {g["generation_id"] for g in gens}
    trained = json.loads((r2 / "train" / "manifest.json").read_text())
    assert (trained["round"], trained["rounds"], round1_student["round"], round1_student["rounds"]) == (2, 2, 1, 2)
    assert trained["inputs"]["student"]["path"] == "data/train/model"
    assert trained["initial_student"]["fingerprint"] == sampled["model"]["fingerprint"]
    # each step's folder as its own stage writes it, from stages/round.py's code
    for step in ("student", "pairs", "curate", "score", "train"):
        manifest = json.loads((r2 / step / "manifest.json").read_text())
        assert manifest["stage"] == step and "stages/round.py" in manifest["code"]
    counts = json.loads((repo / "metrics" / "rounds" / "r2" / "round.json").read_text())
    assert counts["curate"]["kept"] == len(pq.read_table(r2 / "curate" / "curated.parquet"))
    assert counts["train"]["steps"] == trained["counts"]["steps"] > 0
    beta = lambda d: [float(r["beta"]) for r in csv.DictReader(d.open(), delimiter="\t")]  # noqa: E731
    b1 = beta(repo / "plots" / "train" / "plots" / "metrics" / "beta.tsv")
    b2 = beta(repo / "plots" / "rounds" / "r2" / "train" / "plots" / "metrics" / "beta.tsv")
    assert max(b1) == 0.5 and b2[0] == 0.5 and b2[-1] == 1.0 and b2 == sorted(b2)
    ev = json.loads((repo / "metrics" / "rounds" / "r2" / "evaluate.json").read_text())
    assert ev["eval_prompts"] == 32 and "kl_teacher_student" in ev["student_distilled"]
    assert ran(sh(repo, "dvc", "repro")) == ALWAYS


def test_with_rounds_a_training_param_reruns_train_the_rounds_and_evaluate(repo: Path) -> None:
    """The README's claim with on-policy rounds (E = 2 here, 3 in params.yaml): a train
    setting reruns train, each round (it samples the student train wrote)
    and the evaluations; not bootstrap, seed, teacher, student, pairs, curate or score."""
    out = sh(repo, "dvc", "exp", "run", "-S", "train.lr=0.004")
    assert ran(out) == {"train", "evaluate", "round@r2", "round_evaluate@r2"} | ALWAYS


# The README's command for a table of experiments that fits a terminal.
EXP_SHOW = ("dvc", "exp", "show", "--only-changed", "--drop", "Created|State|Executor|^(data|stages)/[^:]*$")


def test_exp_show_is_a_readable_table(repo: Path) -> None:
    """After the experiments above: the README's `dvc exp show` has a few dozen columns
    (what changed: the params set with -S and the headline metrics of
    metrics/summary.json), not one per number of every stage and per dependency."""
    header = sh(repo, *EXP_SHOW, "--csv").splitlines()[0].split(",")
    assert len(header) <= 30 and max(map(len, header)) <= 32, header
    # (the headline columns that differ between the experiments: which ones depends on the run)
    assert "train.method" in header and {h.split(".")[0] for h in header if h[:1] == "r" and h[1:2].isdigit()} == {
        "r1",
        "r2",
    }, header
    assert not any("gates." in h or "/" in h for h in header), header


def test_two_teachers_run_end_to_end_routed_then_mixed(repo: Path) -> None:
    """models.teachers: bootstrap trains a second toy teacher, the teacher stage samples
    both (each record says which), the pairs keep the chosen response's teacher, score
    routes each pair to its teacher (then mixes both) into its top-k, and train and the
    round read that top-k. Routed by category: the teachers are labelled by the smoke
    profile's skills add and reverse, so those prompts go to them, sort's and upper's by
    the hash. The last of the smoke repo's runs."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["models"]["teachers"] = [
        {"label": label, "name": "toy", "revision": None, "weight": 1.0} for label in ("add", "reverse")
    ]
    params["models"]["routing"] = "category"
    params["train"]["teacher_signal"] = "topk"
    params["train"]["rounds"] = {"r2": {"previous": "data/train"}}  # as the round test leaves it
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = sh(repo, "dvc", "repro")
    assert {"bootstrap", "teacher", "pairs", "score", "train", "evaluate", "round@r2"} <= ran(out)
    assert (repo / "data" / "bootstrap" / "teacher-reverse" / "model.safetensors").is_file()
    skill = {
        pr["prompt_id"]: pr["category"] for pr in pq.read_table(repo / "data" / "seed" / "train.parquet").to_pylist()
    }
    gens = pq.read_table(repo / "data" / "teacher" / "generations.parquet").to_pylist()
    by_prompt: dict[str, set[str]] = {}
    for g in gens:
        by_prompt.setdefault(g["prompt_id"], set()).add(g["teacher"])
    assert all(len(t) == 1 for t in by_prompt.values())  # routed: one teacher per prompt
    assert all(t == {skill[pid]} for pid, t in by_prompt.items() if skill[pid] in ("add", "reverse"))
    assert {next(iter(t)) for pid, t in by_prompt.items() if skill[pid] not in ("add", "reverse")} == {"add", "reverse"}
    assert len({g["model"] for g in gens}) == 2
    pairs = pq.read_table(repo / "data" / "pairs" / "pairs.parquet").to_pylist()
    assert all(p["teacher"] == next(iter(by_prompt[p["prompt_id"]])) for p in pairs)
    score = json.loads((repo / "data" / "score" / "manifest.json").read_text())
    assert score["teacher"]["routing"] == "category" and set(score["teacher"]["teachers"]) == {"add", "reverse"}
    assert json.loads((repo / "metrics" / "train.json").read_text())["steps"] > 0
    out = sh(repo, "dvc", "exp", "run", "-S", "models.routing=mix")
    assert {"teacher", "pairs", "score", "train", "evaluate"} <= ran(out)
    gens = pq.read_table(repo / "data" / "teacher" / "generations.parquet").to_pylist()
    assert len(gens) == 2 * len(by_prompt) and {g["teacher"] for g in gens} == {"add", "reverse"}  # mix: all
    assert json.loads((repo / "data" / "score" / "manifest.json").read_text())["teacher"]["routing"] == "mix"
    verified = sh(repo, sys.executable, "-m", "distillflow.cli", "lineage", "verify")  # the second teacher's too
    assert " 0 mismatches;" in verified, verified
