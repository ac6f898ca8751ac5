"""Stage 1, the model: a model spec → (HF model, tokenizer); hookpoint names → modules and capture hooks;
a corpus spec → packed token windows. Everything later in the pipeline reads a model through this stage.
"""
