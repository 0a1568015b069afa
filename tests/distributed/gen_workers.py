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
    beams = pipe(prompts[:2], num_beams=3, num_return_sequences=3, max_new_tokens=6)
    tp = pipe.generator.tp_size
    parallel.destroy()
    return {
        "ids": out,
        "single": single,
        "texts": [t["text"] for t in texts],
        "beams": [[b["text"] for b in row] for row in beams],
        "tp": tp,
    }


def finetune_run(config: str, overrides: list[str]) -> dict:
    """``megagpt finetune`` in this process; returns the final step and samples."""
    from megagpt import parallel
    from megagpt.config import load_config
    from megagpt.training.finetune import finetune

    state = finetune(load_config(config, overrides))
    parallel.destroy()
    return {"step": state.step, "consumed_samples": state.consumed_samples}


def finetune_echo_run(config: str, overrides: list[str]) -> dict:
    """``megagpt finetune`` whose evaluation "generates" each source again as its continuation
    (``TextGenerator.generate`` replaced by an echo), so the BLEU / ROUGE-L it logs are known
    from the eval file alone: a test of which texts the scores pair, not of the model."""
    from megagpt import parallel
    from megagpt.config import load_config
    from megagpt.inference.generate import TextGenerator
    from megagpt.training.finetune import finetune

    def echo(self, prompts, params, max_new_tokens=0, **kwargs):
        return [[list(p) + list(p)] for p in prompts]

    TextGenerator.generate = echo
    state = finetune(load_config(config, overrides))
    parallel.destroy()
    return {"step": state.step}
