"""The fine-tuning worker: one process per job (`python -m ballast.train JOB_DIR`), started detached by the
platform's runner so a platform restart does not stop it.

Everything it needs is in the job directory the platform prepared (`config.json`, `train.jsonl`); everything it
tells the platform goes back through files there: `progress.jsonl` (step, loss, tokens/s, ETA, checkpoints),
`checkpoints/step-N/` (adapter, optimizer, RNG, step: what a resume needs), `adapter/` (the final PEFT adapter,
as the native engine loads it) and `result.json`. It never opens the store.
"""
