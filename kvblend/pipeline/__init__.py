"""The user pipeline: retrieve -> build -> decode (plain or speculative) -> eval, each step reading the previous
step's file and healing it when it cannot serve (see files.py for the files and what they record).

  files.py        paths, what each stage file was made from, stale-input checks
  retrieve.py     step 1, and the healing read of the retrieval file
  plan.py         a sample's prompt ids from its chunks (dataset context cap applied)
  build.py        step 2: every chunk prefilled once into the store (corrupt files rebuilt)
  decode.py       step 3, plain modes; the one decode loop (staging, warm-up, per-sample timing record)
  speculative.py  step 3, speculative with tiered chunks and promotions (the workflow default)
  eval.py         step 4: quality and fidelity per mode
  sweep.py        GPU chunk budget sweep
"""

from kvblend.pipeline.build import run_build
from kvblend.pipeline.decode import run_decode
from kvblend.pipeline.eval import format_eval_table, run_eval
from kvblend.pipeline.files import PipelineError, dataset_label, decode_path, made_from, paths, spec_path
from kvblend.pipeline.plan import SamplePlan, keep_within, load_inputs, plan_first_passages, plan_samples
from kvblend.pipeline.retrieve import ensure_retrieval, run_retrieve
from kvblend.pipeline.speculative import run_speculative
from kvblend.pipeline.sweep import format_sweep_table, run_budget_sweep

__all__ = ["PipelineError", "SamplePlan", "dataset_label", "decode_path", "ensure_retrieval", "format_eval_table",
           "format_sweep_table", "keep_within", "load_inputs", "made_from", "paths", "plan_first_passages",
           "plan_samples", "run_budget_sweep", "run_build", "run_decode", "run_eval", "run_retrieve",
           "run_speculative", "spec_path"]
