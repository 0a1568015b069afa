"""Worker functions of the generation and fine-tuning tests (run on every rank; launcher.py)."""

from __future__ import annotations


def generate_ids(directory: str, prompts: list[str], options: dict) -> dict:
    """Load the model directory over all ranks (TP = world size) and decode ``prompts``."""
    from megagpt import parallel, pipeline
    from megagpt.inference.sampling import make_params

    pipe = pipeline("text-generation", model=directory, device="cpu")
    ids = [pipe.tokenizer.encode(p) for p in prompts]

    params = make_params(
        options.pop("top_k", None), options.pop("top_p", None), options.pop("temperature", None)
    )
    out = pipe.generator.generate(ids, params, **options)
    single = pipe.generator.generate(ids[:1], params, **options)  # one-row steps
    texts = pipe(prompts, top_k=1, max_new_tokens=8)
    tp = pipe.generator.tp_size
    parallel.destroy()
    return {"ids": out, "single": single, "texts": [t["text"] for t in texts], "tp": tp}


def finetune_run(config: str, overrides: list[str]) -> dict:
    """``megagpt finetune`` in this process; returns the final step and samples."""
    from megagpt import parallel
    from megagpt.config import load_config
    from megagpt.training.finetune import finetune

    state = finetune(load_config(config, overrides))
    parallel.destroy()
    return {"step": state.step, "consumed_samples": state.consumed_samples}
