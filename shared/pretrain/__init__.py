"""One small-Llama pre-training harness for the memory-efficient optimizer family (FRUGAL, GaLore; next: Fira,
Q-GaLore, SWAN, SinkGD, ECO): model from a config, a fitted BPE tokenizer, fixed batch orders, the param-group
builder, an optimizer registry with measured state bytes, and one LightningModule."""
