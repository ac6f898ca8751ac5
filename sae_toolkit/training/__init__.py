"""Stage 4, training: an ActivationStore + a TrainConfig → a trained SAE in a run directory (sae/, checkpoints/,
metrics.jsonl, train_config.json), with schedules, dead-latent resampling and exact resume.
"""
