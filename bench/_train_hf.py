"""The baseline of bench/train.py: a plain transformers `Trainer` + `peft` LoRA script, nothing of Ballast.

`python bench/_train_hf.py CONFIG.json`: trains on the JSONL named in the config with the same LoRA config,
batch size, learning rate and steps as the Ballast job, and prints one JSON line: the training loop's wall time
(train begin to end, as the Ballast worker's progress measures it) and the tokens of the batches it trained on
(without padding, as the worker counts them).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)


def main() -> None:
    cfg = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(int(cfg["threads"]))
    torch.manual_seed(cfg["seed"])
    tok = AutoTokenizer.from_pretrained(cfg["checkpoint"])
    rows: list[dict[str, Any]] = []
    for line in Path(cfg["train"]).read_text().splitlines():
        msgs = json.loads(line)["messages"]
        prompt = tok.apply_chat_template(msgs[:-1], add_generation_prompt=True, tokenize=False)
        full = tok.apply_chat_template(msgs, tokenize=False)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        ids = tok(full, add_special_tokens=False)["input_ids"]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                     "labels": [-100] * len(p_ids) + ids[len(p_ids):]})
    model = AutoModelForCausalLM.from_pretrained(cfg["checkpoint"], dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=cfg["rank"], lora_alpha=cfg["alpha"], lora_dropout=0.0,
                                             target_modules=cfg["targets"], task_type="CAUSAL_LM", bias="none"))
    times: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a: Any, **k: Any) -> None:
            times["begin"] = time.perf_counter()

        def on_train_end(self, *a: Any, **k: Any) -> None:
            times["end"] = time.perf_counter()

    args = TrainingArguments(output_dir=cfg["out"], per_device_train_batch_size=cfg["batch_size"],
                             max_steps=cfg["steps"], learning_rate=cfg["lr"], lr_scheduler_type="constant",
                             logging_steps=10_000, save_strategy="no", report_to=[],
                             use_cpu=not torch.cuda.is_available(),
                             seed=cfg["seed"], disable_tqdm=True, dataloader_num_workers=0,
                             remove_unused_columns=False)
    pad = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    seen = {"tokens": 0}

    def collate(features: list[dict[str, Any]]) -> Any:  # counts the tokens of every batch trained on
        batch = pad(features)
        seen["tokens"] += int(batch["attention_mask"].sum())
        return batch

    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[Clock()], data_collator=collate)
    trainer.train()
    print(json.dumps({"seconds": times["end"] - times["begin"], "steps": trainer.state.global_step,
                      "tokens": seen["tokens"]}), flush=True)


if __name__ == "__main__":
    main()
